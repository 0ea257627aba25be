from dataclasses import asdict

import pytest
import torch

from speedasr.core.batch import IGNORE_INDEX, PackedBatch
from speedasr.core.segments import Segments
from speedasr.models.aed import AEDModel, ModelConfig

EOT, VOCAB = 1, 40


def config(**kw):
    base = dict(
        vocab_size=VOCAB, pad_id=0, n_mels=16, subsampling_channels=4, d_model=16,
        encoder_layers=2, encoder_heads=2, conv_kernel=5, decoder_layers=2, dropout=0.0,
        attention_backend="torch", ctc_weight=0.3, label_smoothing=0.1,
    )  # fmt: skip
    return ModelConfig(**{**base, **kw})


def model(**kw):
    torch.manual_seed(0)
    return AEDModel(config(**kw)).eval()


def make_batch(frames, texts, prompts, seed=0) -> PackedBatch:
    """Features (ΣT, 16), tokens = prompt + text, targets as the collator builds them."""
    g = torch.Generator().manual_seed(seed)
    tokens, targets = [], []
    for text, prompt in zip(texts, prompts, strict=True):
        tokens += prompt + text
        targets += [IGNORE_INDEX] * (len(prompt) - 1) + text + [EOT]
    return PackedBatch(
        features=torch.randn(sum(frames), 16, generator=g),
        feature_segments=Segments.from_lengths(frames),
        tokens=torch.tensor(tokens),
        targets=torch.tensor(targets),
        token_segments=Segments.from_lengths(
            [len(p) + len(t) for p, t in zip(prompts, texts, strict=True)]
        ),
        prompt_lengths=tuple(len(p) for p in prompts),
    )


# Mixed lengths: 1-frame and 9-frame utterances (shorter than the 15-frame receptive field),
# a length-1 token sequence (prompt of 1, no text), an utterance whose text outgrows its frames.
FRAMES = [57, 1, 9, 120, 30]
TEXTS = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13, 14], [20] * 9]
PROMPTS = [[2, 3, 4, 5], [2, 3, 4, 5], [2], [2, 3, 4, 5], [2, 3, 4, 5]]


def close(a, b, tol=1e-5):
    """fp32 equality up to rounding, as a relative error of the whole tensor (‖a - b‖ / ‖b‖).

    Elementwise checks are too strict for gradients that cancel to ~0 (e.g. cross-attention queries
    of a 1-frame utterance): their entries are pure rounding noise in any layout.
    """
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def close_grads(got: dict, want: dict):
    """All gradients together within 1e-5 relative; each tensor within 5e-5 (a few gradients, e.g.
    cross-attention queries at initialization, are sums that nearly cancel: ~1e-4 of the others)."""
    assert got.keys() == want.keys()
    flat = [torch.cat([d[n].detach().double().flatten() for n in want]) for d in (got, want)]
    close(*flat)
    for n in want:
        close(got[n], want[n], tol=5e-5)


def loss_and_grads(m, batch):
    m.zero_grad()
    batch.features.requires_grad_()
    out = m(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    grads["features"] = batch.features.grad.clone()
    batch.features.grad = None
    return out, grads


# Absolute positions (token embeddings, encoder output) restart per utterance like rotary ones.
POSITIONS = [{}, {"absolute_token_positions": True, "absolute_memory_positions": True}]
SUBSAMPLING = [
    {"subsampling_factor": 4},
    {"subsampling_factor": 16},
    {"subsampling": "stacking"},
    {"subsampling": "stacking", "subsampling_factor": 4},
    {"subsampling": "stacking", "subsampling_factor": 16},
]
IDS = ["rotary", "absolute", "4x", "16x", "stacking-8x", "stacking-4x", "stacking-16x"]


def with_junk_padding(batch):
    """The padded batch with large random feature values (no NaN) past every length."""
    mask = batch.feature_segments.mask()
    junk = 100.0 * torch.randn(batch.features.shape, generator=torch.Generator().manual_seed(9))
    batch.features = torch.where(mask[..., None], batch.features, junk)
    return batch


@pytest.mark.parametrize("options", POSITIONS + SUBSAMPLING, ids=IDS)
def test_packed_equals_padded(options):
    m = model(**options)
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    packed, g_packed = loss_and_grads(m, batch)
    padded_batch = with_junk_padding(make_batch(FRAMES, TEXTS, PROMPTS).to_padded(pad_id=0))
    padded, g_padded = loss_and_grads(m, padded_batch)
    for name in ("loss", "ce_loss", "ctc_loss"):
        close(getattr(packed, name), getattr(padded, name))
    assert packed.num_target_tokens == padded.num_target_tokens == sum(len(t) + 1 for t in TEXTS)
    g_padded["features"] = batch.feature_segments.unpad(g_padded["features"])
    close_grads(g_packed, g_padded)


@pytest.mark.parametrize("options", POSITIONS + SUBSAMPLING, ids=IDS)
def test_packed_equals_each_utterance_alone(options):
    m = model(**options)
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    packed, g_packed = loss_and_grads(m, batch)
    feats = batch.feature_segments.split(batch.features.detach())
    ce_sum = ctc_sum = 0.0
    grads = {n: torch.zeros_like(g) for n, g in g_packed.items() if n != "features"}
    feature_grads = []
    n_ce, n_ctc = packed.num_target_tokens, sum(len(t) for t in TEXTS)
    for i in range(len(FRAMES)):
        one = make_batch([FRAMES[i]], [TEXTS[i]], [PROMPTS[i]])
        one.features = feats[i].clone()
        out, g = loss_and_grads(m, one)
        # the batch losses are token means: weight each utterance by its token counts
        # (an utterance without text still has a CTC loss, normalized by max(tokens, 1) alone)
        w_ce, w_ctc = out.num_target_tokens / n_ce, max(len(TEXTS[i]), 1) / n_ctc
        ce_sum += out.ce_loss * w_ce
        ctc_sum += out.ctc_loss * w_ctc
        # d(batch loss)/d(theta) = sum_i (0.7 * w_ce_i * dce_i + 0.3 * w_ctc_i * dctc_i): recover
        # it by running each utterance with its own weights folded into the loss
        m.zero_grad()
        one.features.requires_grad_()
        out = m(one)
        (0.7 * w_ce * out.ce_loss + 0.3 * w_ctc * out.ctc_loss).backward()
        for n, p in m.named_parameters():
            grads[n] += p.grad
        feature_grads.append(one.features.grad)
    close(packed.ce_loss, ce_sum)
    close(packed.ctc_loss, ctc_sum)
    grads["features"] = torch.cat(feature_grads)
    close_grads(g_packed, grads)


def test_perturbing_one_utterance_leaves_others_bit_identical():
    m = model()
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    _, g = loss_and_grads(m, batch)
    enc, enc_seg = m.encode(batch.features, batch.feature_segments)
    logits = m.decode_logits(batch.tokens, batch.token_segments, enc, enc_seg)

    other = make_batch(FRAMES, TEXTS, PROMPTS)
    rows = other.feature_segments.segment_ids == 3
    other.features[rows] = torch.randn(int(rows.sum()), 16) * 3
    tok_rows = other.token_segments.segment_ids == 3
    other.tokens[tok_rows & (other.token_segments.positions >= 4)] = 30  # same lengths, new text
    _, g2 = loss_and_grads(m, other)
    enc2, _ = m.encode(other.features, other.feature_segments)
    logits2 = m.decode_logits(other.tokens, other.token_segments, enc2, enc_seg)

    enc_rows = enc_seg.segment_ids != 3
    assert torch.equal(enc[enc_rows], enc2[enc_rows])
    assert torch.equal(logits[~tok_rows], logits2[~tok_rows])
    assert torch.equal(g["features"][~rows], g2["features"][~rows])
    assert not torch.equal(logits[tok_rows], logits2[tok_rows])


@pytest.mark.parametrize("guide", ["diagonal", "ctc"])
def test_guided_attention_loss_packed_equals_padded_and_each_utterance_alone(guide):
    # The guided-attention loss (speedasr.nn.guided_attention) is a mean over target rows of every
    # utterance that has frames: the batch value is the row-weighted mean of the utterances' own.
    m = model(guided_attention_weight=0.5, guided_attention=guide)
    packed, g_packed = loss_and_grads(m, make_batch(FRAMES, TEXTS, PROMPTS))
    padded, g_padded = loss_and_grads(m, make_batch(FRAMES, TEXTS, PROMPTS).to_padded(pad_id=0))
    close(packed.loss, padded.loss)
    close(packed.guide_loss, padded.guide_loss)
    g_padded["features"] = make_batch(FRAMES, TEXTS, PROMPTS).feature_segments.unpad(
        g_padded["features"]
    )
    close_grads(g_packed, g_padded)
    base = model()(make_batch(FRAMES, TEXTS, PROMPTS))
    assert base.guide_loss is None
    close(packed.loss, 0.7 * packed.ce_loss + 0.3 * packed.ctc_loss + 0.5 * packed.guide_loss)
    close(packed.ce_loss, base.ce_loss)  # the loss only adds a term: nothing else changes
    feats = make_batch(FRAMES, TEXTS, PROMPTS).feature_segments.split(
        make_batch(FRAMES, TEXTS, PROMPTS).features
    )
    total = rows = 0.0
    for i in range(len(FRAMES)):
        one = make_batch([FRAMES[i]], [TEXTS[i]], [PROMPTS[i]])
        one.features = feats[i].clone()
        n = len(TEXTS[i]) + 1 if FRAMES[i] > 0 else 0
        total += float(m(one).guide_loss) * n
        rows += n
    assert float(packed.guide_loss) == pytest.approx(total / rows, rel=1e-5)


def test_without_ctc():
    m = model(ctc_weight=0.0)
    assert m.ctc_head is None
    out = m(make_batch(FRAMES, TEXTS, PROMPTS))
    assert out.ctc_loss is None and torch.equal(out.loss, out.ce_loss)


def test_trains_on_a_fixed_batch():
    torch.manual_seed(0)
    m = AEDModel(config(label_smoothing=0.0))
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = m(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.5 * first


def test_config_round_trip_and_validation():
    cfg = config()
    assert ModelConfig(**asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="divisible"):
        config(d_model=18, encoder_heads=4)
    with pytest.raises(ValueError, match="odd"):
        config(conv_kernel=4)
    with pytest.raises(ValueError, match="ctc_weight"):
        config(ctc_weight=1.5)
    with pytest.raises(ValueError, match="pad_id"):
        config(pad_id=VOCAB)
    with pytest.raises(ValueError, match="n_mels"):
        config(n_mels=0)
    with pytest.raises(ValueError, match="guided_attention_sigma"):
        config(guided_attention_sigma=0.0)
    with pytest.raises(ValueError, match="guided_attention_weight"):
        config(guided_attention_weight=-1.0)
    with pytest.raises(ValueError, match="subsampling_factor"):
        config(subsampling_factor=2)
    with pytest.raises(
        ValueError, match="subsampling must be 'dw_striding' or 'stacking', not 'foo'"
    ):
        config(subsampling="foo")
    with pytest.raises(ValueError, match="needs ctc_weight > 0"):
        config(guided_attention="ctc", ctc_weight=0.0)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_features_of_another_width_are_a_named_error(layout):
    # The batch has 16 mel bins per frame; a model built for 24 must say so, not fail as a matmul.
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    batch = batch if layout == "packed" else batch.to_padded(0)
    with pytest.raises(ValueError, match="features have 16 mel bins .* n_mels=24"):
        model(n_mels=24)(batch)


def test_decoder_width_differs_from_encoder():
    m = model(decoder_d_model=24, decoder_heads=2)
    batch = make_batch(FRAMES, TEXTS, PROMPTS)
    a, b = m(batch), m(batch.to_padded(0))
    close(a.loss, b.loss)


@pytest.mark.parametrize("subsampling", ["dw_striding", "stacking"])
@pytest.mark.parametrize("frames", [[0], [0, 0], [0, 40, 1]])
def test_utterances_without_frames(frames, subsampling):
    # A 0-frame utterance has 0 encoder frames: cross-attention sees no key (zeros, not NaN), its
    # CTC term is 0 (infeasible alignments are zeroed), and packed still equals padded.
    m = model(subsampling=subsampling)
    texts, prompts = [[5, 6]] * len(frames), [[2, 3]] * len(frames)
    a = m(make_batch(frames, texts, prompts))
    b = m(make_batch(frames, texts, prompts).to_padded(0))
    assert torch.isfinite(a.loss) and a.num_encoder_frames == sum((n + 7) // 8 for n in frames)
    close(a.loss, b.loss)
    a.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def compare_attention_backends() -> None:
    """Loss and gradients of the packed model, Triton kernels vs the torch path."""
    frames, texts = [57, 1, 9, 30], [[5, 6, 7], [8], [], [20] * 3]
    prompts = [[2, 3, 4, 5], [2, 3, 4, 5], [2], [2, 3, 4, 5]]
    results = []
    for backend in ("torch", "triton"):
        m = model(attention_backend=backend, encoder_layers=1, decoder_layers=1)
        results.append(loss_and_grads(m, make_batch(frames, texts, prompts)))
    (ref, g_ref), (tri, g_tri) = results
    close(tri.loss, ref.loss)
    close_grads(g_tri, g_ref)


@pytest.mark.slow
def test_triton_backend_matches_torch_backend():
    # The Triton kernels run on CPU through the interpreter, which must be on before triton is
    # first imported: run in a fresh process (~10 s).
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-c", "import test_aed; test_aed.compare_attention_backends()"],
        cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_takes_the_tokenizers_vocabulary():
    from types import SimpleNamespace

    cfg = ModelConfig(vocab_size=64, pad_id=0, d_model=32, encoder_heads=2)
    new = cfg.with_vocabulary(SimpleNamespace(vocab_size=96, pad_id=3))
    assert (new.vocab_size, new.pad_id, new.d_model) == (96, 3, 32) and cfg.vocab_size == 64
