import torch

from speedasr.core.segments import Segments
from speedasr.nn.decoder import TransformerDecoder
from speedasr.nn.layout import PackedLayout, PaddedLayout

VOCAB, D_MEM = 30, 12


def decoder(d_model=16):
    torch.manual_seed(0)
    return TransformerDecoder(
        vocab_size=VOCAB, d_model=d_model, layers=2, heads=2, d_ff=32, dropout=0.0,
        memory_dim=D_MEM,
    ).eval()  # fmt: skip


def inputs(token_lengths, frame_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (sum(token_lengths),), generator=g)
    memory = torch.randn(sum(frame_lengths), D_MEM, generator=g)
    return (
        tokens,
        Segments.from_lengths(token_lengths),
        memory,
        Segments.from_lengths(frame_lengths),
    )


def close(a, b):
    scale = float(b.detach().abs().max().clamp_min(1.0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)


# token sequences of length 1, memories of one frame and of none (a zero-frame utterance)
TOKENS = [1, 7, 3, 12, 1]
FRAMES = [4, 1, 9, 6, 0]


def packed(dec, tokens, ts, memory, ms):
    return dec.hidden(tokens, PackedLayout(ts, "torch"), memory, PackedLayout(ms, "torch"))


def padded(dec, tokens, ts, memory, ms):
    out = dec.hidden(ts.pad(tokens), PaddedLayout(ts), ms.pad(memory), PaddedLayout(ms))
    return ts.unpad(out)


def test_packed_equals_padded_and_alone_with_gradients():
    for d_model in (12, 16):  # equal widths, and a memory projection 12 -> 16
        dec = decoder(d_model)
        tokens, ts, memory, ms = inputs(TOKENS, FRAMES)
        memory.requires_grad_()
        h = packed(dec, tokens, ts, memory, ms)
        close(padded(dec, tokens, ts, memory, ms), h)
        for i in range(len(TOKENS)):
            alone = packed(
                dec, ts.split(tokens)[i], Segments.from_lengths([TOKENS[i]]),
                ms.split(memory)[i], Segments.from_lengths([FRAMES[i]]),
            )  # fmt: skip
            close(ts.split(h)[i], alone)
        w = torch.randn_like(h)
        params = [memory, *(p for n, p in dec.named_parameters() if n != "output.bias")]
        g1 = torch.autograd.grad((h * w).sum(), params)
        g2 = torch.autograd.grad((padded(dec, tokens, ts, memory, ms) * w).sum(), params)
        for a, b in zip(g1, g2, strict=True):
            close(a, b)


def test_decoder_is_causal():
    dec = decoder()
    tokens, ts, memory, ms = inputs([6], [5])
    h = packed(dec, tokens, ts, memory, ms)
    tokens2 = tokens.clone()
    tokens2[4:] = (tokens2[4:] + 1) % VOCAB
    h2 = packed(dec, tokens2, ts, memory, ms)
    assert torch.equal(h[:4], h2[:4]) and not torch.equal(h[4:], h2[4:])


def test_perturbing_one_utterance_leaves_others_bit_identical():
    dec = decoder()
    tokens, ts, memory, ms = inputs(TOKENS, FRAMES)
    memory.requires_grad_()
    h = packed(dec, tokens, ts, memory, ms)
    (g,) = torch.autograd.grad(h.square().sum(), memory)
    tokens2, memory2 = tokens.clone(), memory.detach().clone()
    tokens2[ts.segment_ids == 2] = 0
    memory2[ms.segment_ids == 2] += 3.0
    memory2.requires_grad_()
    h2 = packed(dec, tokens2, ts, memory2, ms)
    (g2,) = torch.autograd.grad(h2.square().sum(), memory2)
    rows, mem_rows = ts.segment_ids != 2, ms.segment_ids != 2
    assert torch.equal(h[rows], h2[rows]) and torch.equal(g[mem_rows], g2[mem_rows])
    assert not torch.equal(h[~rows], h2[~rows])


def test_tied_embeddings():
    dec = decoder()
    assert dec.output.weight is dec.embed.weight
