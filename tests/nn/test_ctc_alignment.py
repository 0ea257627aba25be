"""CTC forced alignment against brute force: every path of a few frames, scored and collapsed."""

import itertools

import pytest
import torch

from speedasr.nn.ctc_alignment import ctc_token_frames

BLANK, VOCAB = 0, 4


def collapse(path):
    out, prev = [], None
    for s in path:
        if s != prev and s != BLANK:
            out.append(s)
        prev = s
    return out


def brute_force(log_probs: torch.Tensor, target: list[int]):
    """Best path spelling `target` and the mean frame of each token on it (None: no path)."""
    best, best_path = None, None
    for path in itertools.product(range(VOCAB), repeat=log_probs.shape[0]):
        if collapse(path) != target:
            continue
        score = sum(float(log_probs[t, s]) for t, s in enumerate(path))
        if best is None or score > best:
            best, best_path = score, path
    if best_path is None:
        return None
    centres, k, prev = [[] for _ in target], -1, None
    for t, s in enumerate(best_path):
        if s != BLANK and s != prev:
            k += 1
        if s != BLANK:
            centres[k].append(t)
        prev = s
    return [sum(c) / len(c) for c in centres]


def padded(items, width, fill=0):
    return torch.tensor([x + [fill] * (width - len(x)) for x in items])


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_a_mixed_batch(seed):
    g = torch.Generator().manual_seed(seed)
    cases = [(6, [1, 2]), (5, [3, 3]), (3, [2]), (4, [1, 1, 1]), (7, [2, 3, 1]), (2, [1, 1])]
    frames = [t for t, _ in cases]
    targets = [y for _, y in cases]
    log_probs = torch.randn(len(cases), max(frames), VOCAB, generator=g).log_softmax(-1)
    centres, ok = ctc_token_frames(
        log_probs, torch.tensor(frames), padded(targets, 3),
        torch.tensor([len(y) for y in targets]), BLANK,
    )  # fmt: skip
    for b, (t, y) in enumerate(cases):
        want = brute_force(log_probs[b, :t], y)
        if want is None:  # [1, 1, 1] needs 5 frames and [1, 1] 3: no path
            assert not ok[b]
            continue
        assert ok[b]
        assert centres[b, : len(y)].tolist() == pytest.approx(want)


def test_empty_transcript_and_empty_utterance():
    log_probs = torch.randn(3, 4, VOCAB).log_softmax(-1)
    centres, ok = ctc_token_frames(
        log_probs, torch.tensor([4, 0, 3]), padded([[], [2], [2]], 1),
        torch.tensor([0, 1, 1]), BLANK,
    )  # fmt: skip
    assert ok.tolist() == [True, False, True]  # all blank is a path; no frame is not
    assert centres.shape == (3, 1)
    assert centres[2, 0] == pytest.approx(brute_force(log_probs[2, :3], [2])[0])


def test_batches_without_text_or_without_frames():
    centres, ok = ctc_token_frames(
        torch.randn(2, 3, VOCAB).log_softmax(-1), torch.tensor([3, 1]),
        torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 0]), BLANK,
    )  # fmt: skip
    assert centres.shape == (2, 0) and ok.tolist() == [True, True]
    centres, ok = ctc_token_frames(
        torch.randn(2, 0, VOCAB), torch.tensor([0, 0]), padded([[1], [2]], 1),
        torch.tensor([1, 1]), BLANK,
    )  # fmt: skip
    assert centres.shape == (2, 1) and ok.tolist() == [False, False]
