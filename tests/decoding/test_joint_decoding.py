"""Joint CTC/attention decoding: CTC prefix scores against enumeration, and the search wiring."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from speedasr.core.segments import Segments
from speedasr.decoding import DecodingOptions, decode
from speedasr.decoding.ctc_prefix import CtcPrefixScorer
from speedasr.models.aed import AEDModel, ModelConfig

BLANK = 0


def enumerate_ctc(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Probability of every label sequence, by summing over all V**T frame paths (the definition
    of CTC, independent of any recursion)."""
    frames, vocab = log_probs.shape
    probs: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(vocab), repeat=frames):
        labels, prev = [], None
        for p in path:
            if p != prev and p != BLANK:
                labels.append(p)
            prev = p
        weight = math.exp(sum(log_probs[t, p].item() for t, p in enumerate(path)))
        probs[tuple(labels)] = probs.get(tuple(labels), 0.0) + weight
    return probs


def prefix_probability(probs, prefix) -> float:
    return sum(p for y, p in probs.items() if y[: len(prefix)] == tuple(prefix))


def test_prefix_and_exact_scores_match_enumeration_and_ctc_loss():
    frames, vocab = [5, 3, 0], 4
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(sum(frames), vocab, generator=gen, dtype=torch.float64)
    log_probs = log_probs.log_softmax(-1)
    seg = Segments.from_lengths(frames)
    # Two rows per utterance, growing different prefixes; repeats (2, 2) need a blank between.
    rows = torch.tensor([0, 0, 1, 1, 2])
    grow = [[2, 2, 3], [1, 3, 1], [3, 3, 1], [2, 1, 2], [1, 1, 1]]
    scorer = CtcPrefixScorer(log_probs, seg, rows, BLANK)
    per_utt = [enumerate_ctc(x) if len(x) else {(): 1.0} for x in seg.split(log_probs)]
    candidates = torch.tensor([[0, 1, 2, 3]] * len(rows))
    prefixes = [[] for _ in rows]
    for step in range(3):
        got = scorer.extend(candidates).exp()
        for r, u in enumerate(rows.tolist()):
            for j, c in enumerate(candidates[r].tolist()):
                want = 0.0 if c == BLANK else prefix_probability(per_utt[u], prefixes[r] + [c])
                assert got[r, j].item() == pytest.approx(want, rel=1e-5, abs=1e-9), (
                    r,
                    prefixes[r],
                    c,
                )
        chosen = torch.tensor([g[step] for g in grow])
        scorer.select(torch.arange(len(rows)), chosen)  # candidate j is label j
        for r in range(len(rows)):
            prefixes[r].append(grow[r][step])
        exact = scorer.exact().exp()
        for r, u in enumerate(rows.tolist()):
            assert exact[r].item() == pytest.approx(
                per_utt[u].get(tuple(prefixes[r]), 0.0), rel=1e-5
            )
    # The exact score of a full sequence is what CTC training maximizes.
    for r, u in enumerate(rows.tolist()[:4]):
        x = seg.split(log_probs)[u]
        loss = F.ctc_loss(x[:, None], torch.tensor([prefixes[r]]), torch.tensor([len(x)]),
                          torch.tensor([3]), blank=BLANK, reduction="none")  # fmt: skip
        assert scorer.exact()[r].item() == pytest.approx(-loss.item(), rel=1e-5) or (
            math.isinf(loss.item()) and scorer.exact()[r].item() == float("-inf")
        )


def test_select_reorders_rows_like_a_beam_search():
    log_probs = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    seg = Segments.from_lengths([6])
    a = CtcPrefixScorer(log_probs, seg, torch.tensor([0, 0]), BLANK)
    a.extend(torch.tensor([[1, 2], [3, 4]]))
    a.select(torch.tensor([1, 0]), torch.tensor([0, 1]))  # row 0 <- [3], row 1 <- [2]
    b = CtcPrefixScorer(log_probs, seg, torch.tensor([0]), BLANK)
    b.extend(torch.tensor([[3]]))
    b.select(torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(a.exact()[0], b.exact()[0])
    with pytest.raises(RuntimeError, match="extend"):
        a.select(torch.tensor([0]), torch.tensor([0]))


# --- the search ---------------------------------------------------------------------------------
EOT, VOCAB, MELS = 1, 24, 16
FRAMES = [40, 3, 90]
PROMPTS = [[2, 3], [2], [2, 3, 4, 5]]


def ctc_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, n_mels=MELS, subsampling_channels=4, d_model=16, encoder_layers=1,
        encoder_heads=2, decoder_layers=2, dropout=0.0, attention_backend="torch", ctc_weight=0.5,
    )  # fmt: skip
    return AEDModel(cfg).eval()


def features(seed=0):
    return torch.randn(sum(FRAMES), MELS, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_joint_batch_equals_each_utterance_alone(beam_size):
    m = ctc_model()
    seg = Segments.from_lengths(FRAMES)
    x = features(1)
    options = DecodingOptions(beam_size=beam_size, ctc_weight=0.3, max_len=8)
    batch = decode(m, x, seg, PROMPTS, EOT, options)
    for i, xi in enumerate(seg.split(x)):
        alone = decode(m, xi, Segments.from_lengths([FRAMES[i]]), [PROMPTS[i]], EOT, options)
        assert alone[0] == batch[i]


@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_joint_greedy_takes_the_best_joint_step_among_the_decoder_proposals(weight):
    """Beam size 1, replayed step by step: attention log-probs from the full teacher-forced
    forward (no KV cache), CTC prefix scores from a fresh scorer (checked against enumeration
    above); each emitted token, and where it stops, must be the best joint proposal."""
    m = ctc_model(2)
    seg = Segments.from_lengths(FRAMES)
    x = features(2)
    hyps = decode(m, x, seg, PROMPTS, EOT, DecodingOptions(ctc_weight=weight, max_len=10))
    # Not vacuous: the untrained decoder alone repeats one token up to the limit; CTC ends it.
    assert decode(m, x, seg, PROMPTS, EOT, DecodingOptions(max_len=10)) == [[4] * 10] * 3
    assert any(len(h) < 10 for h in hyps)
    enc, enc_seg = m.encode(x, seg)
    with torch.no_grad():
        for i, hyp in enumerate(hyps):
            e = enc_seg.split(enc)[i]
            e_seg = Segments.from_lengths([len(e)])
            scorer = CtcPrefixScorer(m.ctc_log_probs(e), e_seg, torch.tensor([0]), m.cfg.pad_id)
            seq = PROMPTS[i] + hyp
            att = m.decode_logits(torch.tensor(seq), Segments.from_lengths([len(seq)]), e, e_seg)
            att = att.log_softmax(-1)[len(PROMPTS[i]) - 1 :]
            for t in range(len(hyp) + 1):
                # the 4 (= max(2 * beam, 4)) best tokens other than end-of-text, and end-of-text
                others = att[t].clone()
                others[EOT] = float("-inf")
                top, labels = others.topk(4)
                top = torch.cat((top, att[t, EOT : EOT + 1]))
                labels = torch.cat((labels, torch.tensor([EOT])))
                prefix = scorer.extend(labels[None])[0]
                prefix = torch.where(labels == EOT, scorer.exact()[0], prefix)
                joint = (1 - weight) * top + weight * (prefix - scorer.prefix[0])
                best = labels[joint.argmax()].item()
                if t == len(hyp):
                    assert best == EOT or len(hyp) == 10
                    break
                assert best == hyp[t], (i, t, labels.tolist(), joint.tolist())
                scorer.select(torch.tensor([0]), joint.argmax()[None])


def test_joint_options_and_missing_head():
    with pytest.raises(ValueError, match=r"ctc_weight must be in \[0, 1\]"):
        DecodingOptions(ctc_weight=1.5)
    with pytest.raises(ValueError, match="joint decoding"):
        DecodingOptions(method="ctc", ctc_weight=0.3)
    with pytest.raises(ValueError, match="use_cache=False"):
        DecodingOptions(ctc_weight=0.3, use_cache=False)
    torch.manual_seed(0)
    no_head = AEDModel(ModelConfig(
        vocab_size=VOCAB, n_mels=MELS, subsampling_channels=4, d_model=16, encoder_layers=1,
        encoder_heads=2, decoder_layers=1, attention_backend="torch", ctc_weight=0.0,
    )).eval()  # fmt: skip
    seg = Segments.from_lengths(FRAMES)
    with pytest.raises(ValueError, match="no CTC head"):
        decode(no_head, features(), seg, PROMPTS, EOT, DecodingOptions(ctc_weight=0.3))
