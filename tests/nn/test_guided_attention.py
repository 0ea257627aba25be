"""The guided-attention loss against hand-computed values (uniform and one-hot attention)."""

import math

import pytest
import torch

from speedasr.core.segments import Segments
from speedasr.nn.guided_attention import AlignmentPrior


def diagonal_cost(i: int, m: int, t: int, frames: int, sigma: float) -> float:
    """Tachibana's W for target row i of m at frame t of `frames`, written out by hand."""
    d = (i + 0.5) / m - (t + 0.5) / frames
    return 1 - math.exp(-d * d / (2 * sigma * sigma))


# Three utterances: prompts of 4, 1 and 2 tokens; texts of 3, 5 and 0 tokens; 7, 11 and 0 frames.
PROMPTS, TEXTS, FRAMES = (4, 1, 2), (3, 5, 0), (7, 11, 0)
SIGMA = 0.3


def segments():
    tokens = Segments.from_lengths([p + n for p, n in zip(PROMPTS, TEXTS, strict=True)])
    return tokens, Segments.from_lengths(FRAMES)


@pytest.mark.parametrize("heads", [1, 3])
def test_uniform_attention_costs_the_mean_of_each_row(heads):
    tokens, memory = segments()
    prior = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    q = torch.zeros(tokens.total, heads, 4)  # zero queries: every real frame weighs 1 / T
    k = torch.randn(memory.total, heads, 4)
    prior.add(q, k)
    rows, want = 0, 0.0
    for n, frames in zip(TEXTS, FRAMES, strict=True):
        if frames == 0:
            continue  # nothing to align: no row counts
        m = n + 1  # text tokens + end-of-text
        for i in range(m):
            want += sum(diagonal_cost(i, m, t, frames, SIGMA) for t in range(frames)) / frames
        rows += m
    assert prior.num_rows == rows == 4 + 6
    assert float(prior.loss()) == pytest.approx(want / rows, rel=1e-6)


def test_one_hot_attention_costs_the_chosen_cells_and_ignores_prompt_rows():
    tokens, memory = segments()
    # queries pick a frame each: q = 200 * e_f, k_t = e_t, so softmax(q.k / 4) is one-hot at f
    dim = 16
    k = torch.cat([torch.eye(dim)[:n] for n in FRAMES])[:, None]
    chosen = {0: [6, 0, 3, 5], 1: [0, 2, 4, 6, 8, 10]}  # target row -> frame, per utterance
    q = torch.zeros(tokens.total, 1, dim)
    for u, picks in chosen.items():
        start = tokens.offsets[u] + PROMPTS[u] - 1  # the first query that predicts a target
        for i, f in enumerate(picks):
            q[start + i, 0, f] = 200.0
    # prompt rows of utterance 0 look at the last frame: they must not count
    q[0:3, 0, 6] = 200.0
    prior = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    prior.add(q, k)
    want = [
        diagonal_cost(i, TEXTS[u] + 1, f, FRAMES[u], SIGMA)
        for u, picks in chosen.items()
        for i, f in enumerate(picks)
    ]
    assert float(prior.loss()) == pytest.approx(sum(want) / len(want), rel=1e-5)


def test_padded_inputs_give_the_packed_loss_and_layers_are_averaged():
    tokens, memory = segments()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(tokens.total, 2, 8, generator=g)
    k = torch.randn(memory.total, 2, 8, generator=g)
    packed = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    packed.add(q, k)
    packed.add(2 * q, k)
    padded = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    # padded layouts may be wider than the longest sequence, with junk in the padding
    q_pad = torch.randn(3, tokens.max_seqlen + 2, 2, 8, generator=g)
    k_pad = torch.randn(3, memory.max_seqlen + 5, 2, 8, generator=g)
    q_pad[tokens.segment_ids, tokens.positions] = q
    k_pad[memory.segment_ids, memory.positions] = k
    padded.add(q_pad, k_pad)
    padded.add(2 * q_pad, k_pad)
    one = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    one.add(q, k)
    two = AlignmentPrior(tokens, memory, PROMPTS, SIGMA)
    two.add(2 * q, k)
    assert float(padded.loss()) == pytest.approx(float(packed.loss()), rel=1e-6)
    assert float(packed.loss()) == pytest.approx((float(one.loss()) + float(two.loss())) / 2)


def test_sigma_must_be_positive():
    tokens, memory = segments()
    with pytest.raises(ValueError, match="sigma"):
        AlignmentPrior(tokens, memory, PROMPTS, 0.0)


def band_cost(t: int, centre: float, width: float) -> float:
    return 1 - math.exp(-((t - centre) ** 2) / (2 * width * width))


def test_given_centres_replace_the_diagonal_where_aligned():
    tokens, memory = segments()
    centres = torch.tensor([[1.0, 3.5, 5.0, 0, 0], [0.0, 2.0, 4.0, 6.0, 9.5], [0, 0, 0, 0, 0]])
    q = torch.zeros(tokens.total, 1, 4)
    k = torch.randn(memory.total, 1, 4)
    for aligned in ([True, True, True], [False, True, True]):
        prior = AlignmentPrior(
            tokens, memory, PROMPTS, SIGMA, centres, torch.tensor(aligned), centre_sigma=1.5
        )
        prior.add(q, k)
        want = 0.0
        for u, (n, frames) in enumerate(zip(TEXTS[:2], FRAMES[:2], strict=True)):
            for i in range(n + 1):  # uniform attention: the mean of the row's costs
                if not aligned[u]:
                    cost = [diagonal_cost(i, n + 1, t, frames, SIGMA) for t in range(frames)]
                else:
                    c = float(centres[u, i]) if i < n else frames - 1  # end-of-text: last frame
                    cost = [band_cost(t, c, 1.5) for t in range(frames)]
                want += sum(cost) / frames
        assert float(prior.loss()) == pytest.approx(want / 10, rel=1e-6)
