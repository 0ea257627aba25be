import pytest
import torch

from speedasr.core.batch import IGNORE_INDEX, PackedBatch
from speedasr.core.segments import Segments
from speedasr.decoding import greedy_decode
from speedasr.models.aed import AEDModel, ModelConfig

EOT, VOCAB, MELS = 1, 24, 16


def model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_mels=MELS, subsampling_channels=4, d_model=16, encoder_layers=1,
        encoder_heads=2, decoder_layers=1, dropout=0.0, attention_backend="torch",
        label_smoothing=0.0, ctc_weight=0.0,
    )  # fmt: skip
    return AEDModel(cfg).eval()


FRAMES = [40, 3, 90]
PROMPTS = [[2, 3], [2], [2, 3, 4, 5]]


def features(seed=0):
    return torch.randn(sum(FRAMES), MELS, generator=torch.Generator().manual_seed(seed))


def test_greedy_is_the_argmax_of_its_own_teacher_forced_logits():
    m = model()
    seg = Segments.from_lengths(FRAMES)
    x = features()
    hyps = greedy_decode(m, x, seg, PROMPTS, eot_id=EOT, max_len=6)
    enc, enc_seg = m.encode(x, seg)
    for i, (hyp, prompt) in enumerate(zip(hyps, PROMPTS, strict=True)):
        assert len(hyp) <= 6 and EOT not in hyp
        seq = prompt + hyp
        e = enc_seg.split(enc)[i]
        logits = m.decode_logits(
            torch.tensor(seq), Segments.from_lengths([len(seq)]), e, Segments.from_lengths([len(e)])
        )
        predicted = logits[len(prompt) - 1 :].argmax(-1).tolist()
        assert predicted[: len(hyp)] == hyp
        if len(hyp) < 6:
            assert predicted[len(hyp)] == EOT


def test_batch_equals_each_utterance_alone():
    m = model()
    seg = Segments.from_lengths(FRAMES)
    x = features(1)
    batch = greedy_decode(m, x, seg, PROMPTS, eot_id=EOT, max_len=5)
    for i, xi in enumerate(seg.split(x)):
        alone = greedy_decode(m, xi, Segments.from_lengths([FRAMES[i]]), [PROMPTS[i]], EOT, 5)
        assert alone[0] == batch[i]


def test_learns_to_transcribe_two_utterances():
    m = model()
    m.train()
    texts = [[5, 6, 7, 8], [9, 10]]
    frames = [60, 35]
    prompt = [2, 3]
    tokens, targets = [], []
    for t in texts:
        tokens += prompt + t
        targets += [IGNORE_INDEX] * (len(prompt) - 1) + t + [EOT]
    batch = PackedBatch(
        features=torch.randn(sum(frames), MELS, generator=torch.Generator().manual_seed(3)),
        feature_segments=Segments.from_lengths(frames),
        tokens=torch.tensor(tokens),
        targets=torch.tensor(targets),
        token_segments=Segments.from_lengths([len(prompt) + len(t) for t in texts]),
        prompt_lengths=(2, 2),
    )
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        loss = m(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    hyps = greedy_decode(m, batch.features, batch.feature_segments, [prompt] * 2, EOT, 10)
    assert hyps == texts


def test_bad_arguments():
    m = model()
    seg = Segments.from_lengths(FRAMES)
    with pytest.raises(ValueError, match="prompts"):
        greedy_decode(m, features(), seg, PROMPTS[:2], EOT, 5)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_decode(m, features(), seg, [[2], [], [2]], EOT, 5)
    assert greedy_decode(m, features(), seg, PROMPTS, EOT, 0) == [[], [], []]


# --- strategies and the KV cache ------------------------------------------------------------------
from speedasr.decoding import (  # noqa: E402
    DecodingOptions,
    KVCache,
    decode,
)
from speedasr.decoding.cache import prefill, step  # noqa: E402


def wide_model(seed=1, **options):
    """Two decoder blocks, a decoder wider than the encoder (memory projection), 4 heads."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_mels=MELS, subsampling_channels=4, d_model=16, encoder_layers=1,
        encoder_heads=2, decoder_layers=2, decoder_d_model=32, decoder_heads=4, dropout=0.0,
        attention_backend="torch", ctc_weight=0.0, **options,
    )  # fmt: skip
    return AEDModel(cfg).eval()


def positioned_model(seed=1):
    """``wide_model`` with absolute positions on the token embeddings and the encoder output:
    the cache must add the positions the full forward adds."""
    return wide_model(seed, absolute_token_positions=True, absolute_memory_positions=True)


@pytest.mark.parametrize("make", [model, wide_model, positioned_model])
def test_cached_step_logits_equal_the_full_forward(make):
    m = make()
    seg = Segments.from_lengths(FRAMES)
    enc, enc_seg = m.encode(features(2), seg)
    gen = torch.Generator().manual_seed(5)
    continuations = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (3, 5, 1)]
    with torch.no_grad():
        cache = KVCache.allocate(m.decoder, enc, enc_seg, capacity=16)
        stepped = [prefill(m.decoder, cache, PROMPTS)]
        for t in range(5):  # rows advance together; the shorter continuations pad with token 2
            tokens = torch.tensor([c[t] if t < len(c) else 2 for c in continuations])
            stepped.append(step(m.decoder, cache, tokens))
        for i, (prompt, cont) in enumerate(zip(PROMPTS, continuations, strict=True)):
            seq = prompt + cont
            e = enc_seg.split(enc)[i]
            full = m.decode_logits(
                torch.tensor(seq), Segments.from_lengths([len(seq)]), e,
                Segments.from_lengths([len(e)]),
            )  # fmt: skip
            for t in range(len(cont) + 1):
                torch.testing.assert_close(
                    stepped[t][i], full[len(prompt) - 1 + t], rtol=1e-4, atol=1e-5
                )


@pytest.mark.parametrize("make", [model, wide_model, positioned_model])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cached_greedy_equals_uncached_greedy(make, seed):
    m = make()
    seg = Segments.from_lengths(FRAMES)
    x = features(seed)
    for max_len in (1, 4, 12):
        cached = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=max_len))
        uncached = decode(
            m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=max_len, use_cache=False)
        )
        assert cached == uncached
        assert all(len(h) <= max_len and EOT not in h for h in cached)


@pytest.mark.parametrize("make", [model, wide_model])
def test_beam_size_one_equals_greedy(make):
    m = make()
    seg = Segments.from_lengths(FRAMES)
    for seed in range(3):
        x = features(seed)
        greedy = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=10))
        beam = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=10, beam_size=1))
        assert beam == greedy


@pytest.mark.parametrize("options", [
    DecodingOptions(max_len=8), DecodingOptions(max_len=8, beam_size=3),
    DecodingOptions(max_len=8, beam_size=4, length_penalty=0.0),
])  # fmt: skip
def test_batched_equals_one_by_one(options):
    m = wide_model()
    seg = Segments.from_lengths(FRAMES)
    x = features(3)
    batch = decode(m, x, seg, PROMPTS, EOT, options)
    for i, xi in enumerate(seg.split(x)):
        alone = decode(m, xi, Segments.from_lengths([FRAMES[i]]), [PROMPTS[i]], EOT, options)
        assert alone[0] == batch[i]


def test_beam_search_ranks_by_length_normalized_log_probability():
    """The beam winner scores at least as well as the greedy hypothesis (both scored alike)."""
    m = wide_model(4)
    seg = Segments.from_lengths(FRAMES)
    x = features(4)
    enc, enc_seg = m.encode(x, seg)

    def score(i, hyp, alpha):
        seq = PROMPTS[i] + hyp + [EOT]
        e = enc_seg.split(enc)[i]
        logp = m.decode_logits(
            torch.tensor(seq), Segments.from_lengths([len(seq)]), e, Segments.from_lengths([len(e)])
        ).log_softmax(-1)[len(PROMPTS[i]) - 1 : -1]
        total = logp.gather(1, torch.tensor(hyp + [EOT])[:, None]).sum()
        return float(total) / (len(hyp) + 1) ** alpha

    with torch.no_grad():
        for alpha in (0.0, 1.0):
            greedy = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=30))
            beam = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(
                max_len=30, beam_size=5, length_penalty=alpha))  # fmt: skip
            for i in range(len(PROMPTS)):
                if len(greedy[i]) < 30 and len(beam[i]) < 30:  # both ended with end-of-text
                    assert score(i, beam[i], alpha) >= score(i, greedy[i], alpha) - 1e-5


@pytest.mark.parametrize("beam_size", [1, 3])
def test_forced_lengths_ignore_end_of_text(beam_size):
    m = model()
    seg = Segments.from_lengths(FRAMES)
    opts = DecodingOptions(ignore_eot=True, beam_size=beam_size)
    hyps = decode(m, features(), seg, PROMPTS, EOT, opts, max_new_tokens=[7, 0, 3])
    assert [len(h) for h in hyps] == [7, 0, 3]


def test_default_length_guard_follows_each_utterance_duration():
    from speedasr.decoding import length_limits

    limits = length_limits(Segments.from_lengths([0, 25, 100]), DecodingOptions())
    assert limits.tolist() == [8, 8 + 20, 8 + 80]  # 10 tokens/s, 0.08 s per encoder frame


def test_utterance_without_frames_decodes_like_the_packed_forward():
    m = model()
    frames = [0, 40]
    seg = Segments.from_lengths(frames)
    x = torch.randn(sum(frames), MELS, generator=torch.Generator().manual_seed(0))
    cached = decode(m, x, seg, PROMPTS[:2], EOT, DecodingOptions(max_len=5))
    uncached = decode(m, x, seg, PROMPTS[:2], EOT, DecodingOptions(max_len=5, use_cache=False))
    assert cached == uncached


def test_option_conflicts_are_named():
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        DecodingOptions(beam_size=0)
    with pytest.raises(ValueError, match="use_cache=False"):
        DecodingOptions(beam_size=2, use_cache=False)
    with pytest.raises(ValueError, match="max_len"):
        DecodingOptions(max_len=-1)
    m = model()
    with pytest.raises(ValueError, match="length limits"):
        decode(m, features(), Segments.from_lengths(FRAMES), PROMPTS, EOT, max_new_tokens=[1])


# --- CTC greedy decoding ------------------------------------------------------------------------
def ctc_model(layers: int = 1):
    """A hybrid model (CTC head) with ``layers`` encoder and decoder blocks."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_mels=MELS, subsampling_channels=4, d_model=16, encoder_layers=layers,
        encoder_heads=2, decoder_layers=layers, dropout=0.0, attention_backend="torch",
        ctc_weight=0.5,
    )  # fmt: skip
    return AEDModel(cfg).eval()


def collapse(labels: list[int], blank: int) -> list[int]:
    """The CTC best-path rule, written plainly: merge runs, then drop blanks."""
    out, prev = [], None
    for label in labels:
        if label != prev and label != blank:
            out.append(label)
        prev = label
    return out


class FixedCtc:
    """A stand-in model whose CTC head returns the given per-frame labels as one-hot scores."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)
        self.cfg = ModelConfig(vocab_size=VOCAB, pad_id=0)

    def ctc_log_probs(self, enc):
        return torch.nn.functional.one_hot(self.labels, VOCAB).float().log()


def test_ctc_collapse_by_hand():
    from speedasr.decoding import CtcGreedySearch

    # utterance 0: 5 5 _ 5 7 7 -> 5 5 7; utterance 1 starts with 7 right after utterance 0's 7:
    # it is a new utterance, so its 7 is emitted; utterance 2 is all blank; utterance 3 is empty.
    labels = [5, 5, 0, 5, 7, 7, 7, 0, 9, 0, 0]
    seg = Segments.from_lengths([6, 3, 2, 0])
    search = CtcGreedySearch(DecodingOptions(method="ctc"))
    limits = torch.tensor([10, 10, 10, 10])
    got = search.search(FixedCtc(labels), torch.zeros(11, 1), seg, [[2]] * 4, EOT, limits)
    assert got == [[5, 5, 7], [7, 9], [], []]
    short = search.search(FixedCtc(labels), torch.zeros(11, 1), seg, [[2]] * 4, EOT, limits - 8)
    assert short == [[5, 5], [7, 9], [], []]


def test_ctc_greedy_batch_equals_each_utterance_alone_and_the_plain_rule():
    m = ctc_model()
    x = features(3)
    seg = Segments.from_lengths(FRAMES)
    got = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(method="ctc"))
    assert any(got)  # untrained, but not all blank: the comparison below is not vacuous
    for xi, ids in zip(seg.split(x), got, strict=True):
        enc, _ = m.encode(xi, Segments.from_lengths([xi.shape[0]]))  # this utterance alone
        best = m.ctc_log_probs(enc).argmax(-1).tolist()
        assert ids == collapse(best, blank=m.cfg.pad_id)


def test_ctc_options_and_missing_head():
    with pytest.raises(ValueError, match="greedy"):
        DecodingOptions(method="ctc", beam_size=4)
    with pytest.raises(ValueError, match="method"):
        DecodingOptions(method="rnnt")
    seg = Segments.from_lengths(FRAMES)
    with pytest.raises(ValueError, match="no CTC head"):
        decode(model(), features(), seg, PROMPTS, EOT, DecodingOptions(method="ctc"))


# --- inference in bfloat16 (`--dtype bfloat16`) ---------------------------------------------------
def test_bfloat16_model_computes_in_bfloat16_and_tracks_float32():
    """A model cast to bfloat16 takes the float32 features every loader produces; its encoder
    output and cached decoder logits stay within bfloat16 rounding of the float32 model's."""
    import copy

    fp = ctc_model(layers=2)
    bf = copy.deepcopy(fp).to(torch.bfloat16)
    seg = Segments.from_lengths(FRAMES)
    x = features(3)  # float32
    with torch.no_grad():
        enc_fp, enc_seg = fp.encode(x, seg)
        enc_bf, _ = bf.encode(x, seg)
        assert enc_bf.dtype == torch.bfloat16
        assert 0 < (enc_bf.float() - enc_fp).abs().max() < 0.1 * enc_fp.abs().max()
        logits = {}
        for name, m, enc in (("fp", fp, enc_fp), ("bf", bf, enc_bf)):
            cache = KVCache.allocate(m.decoder, enc, enc_seg, capacity=8)
            assert cache.dtype == torch.float32  # on a CPU; bfloat16 on a GPU
            out = [prefill(m.decoder, cache, PROMPTS)]
            out += [step(m.decoder, cache, torch.tensor([5, 6, 7])) for _ in range(3)]
            logits[name] = torch.stack(out)
    assert logits["bf"].dtype == torch.bfloat16
    scale = logits["fp"].abs().max()
    torch.testing.assert_close(logits["bf"].float(), logits["fp"], rtol=0, atol=0.05 * scale)


@pytest.mark.parametrize(
    "options",
    [DecodingOptions(max_len=6), DecodingOptions(beam_size=3, max_len=6),
     DecodingOptions(ctc_weight=0.3, beam_size=2, max_len=6), DecodingOptions(method="ctc")],
)  # fmt: skip
def test_every_search_runs_in_bfloat16_and_batched_equals_one_by_one(options):
    m = ctc_model(layers=2).to(torch.bfloat16)
    seg = Segments.from_lengths(FRAMES)
    x = features(4)
    batch = decode(m, x, seg, PROMPTS, EOT, options)
    assert any(batch)
    for i, xi in enumerate(seg.split(x)):
        alone = decode(m, xi, Segments.from_lengths([FRAMES[i]]), [PROMPTS[i]], EOT, options)
        assert alone[0] == batch[i]
