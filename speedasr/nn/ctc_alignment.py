"""CTC forced alignment (Viterbi): where in the audio each token of a known transcript is.

``ctc_token_frames`` finds, for every utterance of a batch, the single most likely CTC path that
spells its transcript (blanks allowed between tokens and required between repeats) and returns
the centre frame of each token on that path. The guided-attention loss uses it to tell the
decoder's cross-attention where each token is (``speedasr.nn.guided_attention``).

The dynamic programme runs over the standard extended label sequence ``blank, y1, blank, y2, ...,
blank`` (``S = 2N + 1`` states), vectorised over the batch and the states, one step per frame.
"""

from __future__ import annotations

import torch

_NEG = -1e30  # log(0) that stays finite: max/argmax never see NaN


def ctc_token_frames(
    log_probs: torch.Tensor,
    frame_lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Viterbi CTC alignment of padded transcripts to padded log-probabilities.

    Args:
        log_probs: ``(B, T, V)`` per-frame log-probabilities (padding past each length ignored).
        frame_lengths: ``(B,)`` frames per utterance.
        targets: ``(B, N)`` token ids (padding past each length ignored).
        target_lengths: ``(B,)`` tokens per utterance.
        blank: the CTC blank id.

    Returns:
        centres: ``(B, N)`` float, the mean frame index of each token's frames on the best path.
        ok: ``(B,)`` bool, False where no path exists (more frames needed than there are, or no
            frame at all); those rows of ``centres`` are meaningless.
    """
    batch, frames, _ = log_probs.shape
    device = log_probs.device
    n_max = targets.shape[1]
    states = 2 * n_max + 1
    if frames == 0:  # no frame anywhere: nothing can be aligned
        return torch.zeros(batch, n_max, device=device), torch.zeros(batch, dtype=torch.bool)
    lp = log_probs.detach().float()
    # extended labels: blank at even states, token k at state 2k + 1
    ext = torch.full((batch, states), blank, dtype=torch.long, device=device)
    ext[:, 1::2] = targets
    # a skip s-2 -> s is allowed into a token state whose token differs from the previous token
    skip = torch.zeros(batch, states, dtype=torch.bool, device=device)
    skip[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    last_state = 2 * target_lengths  # final blank; the final token is last_state - 1
    valid_state = torch.arange(states, device=device)[None] <= last_state[:, None]

    emit = lp.gather(2, ext[:, None, :].expand(batch, frames, states))  # (B, T, S)
    score = torch.full((batch, states), _NEG, device=device)
    score[:, 0] = emit[:, 0, 0]
    if states > 1:
        score[:, 1] = torch.where(target_lengths > 0, emit[:, 0, 1], _NEG)
    back = torch.zeros(batch, frames, states, dtype=torch.uint8, device=device)  # 0 stay, 1, 2
    neg = torch.full((batch, 1), _NEG, device=device)
    for t in range(1, frames):
        stay = score
        step = torch.cat([neg, score], 1)[:, :states]  # from s - 1
        jump = torch.where(skip, torch.cat([neg, neg, score], 1)[:, :states], _NEG)  # from s - 2
        best, arg = torch.stack([stay, step, jump]).max(0)
        new = torch.where(valid_state, best + emit[:, t], _NEG)
        live = (t < frame_lengths)[:, None]  # past an utterance's end its scores stand still
        score = torch.where(live, new, score)
        back[:, t] = torch.where(live, arg, 0).to(torch.uint8)

    rows = torch.arange(batch, device=device)
    end_blank = score[rows, last_state]
    end_token = torch.where(target_lengths > 0, score[rows, (last_state - 1).clamp(min=0)], _NEG)
    state = torch.where(end_token > end_blank, last_state - 1, last_state)
    ok = (torch.maximum(end_blank, end_token) > _NEG / 2) & (frame_lengths > 0)

    # backtrack on the host: one pass over the frames, vectorised over the batch
    sums = torch.zeros(batch, n_max + 1, device=device)
    counts = torch.zeros(batch, n_max + 1, device=device)
    for t in range(frames - 1, -1, -1):
        live = t < frame_lengths
        token = torch.where((state % 2 == 1) & live, state // 2, n_max)  # n_max: a dump slot
        sums[rows, token] += t
        counts[rows, token] += 1
        move = back[rows, t, state].long()
        state = torch.where(live & (t > 0), state - move, state)
    centres = sums[:, :n_max] / counts[:, :n_max].clamp(min=1)
    return centres, ok
