"""A diagonal prior on cross-attention: a training-only loss that teaches the decoder to align.

An attention decoder trained from scratch first learns a language model: its cross-attention
starts uniform, the context it reads carries almost nothing, and it can take thousands of updates
before it finds where in the audio each token is (issue 17, docs/training.md). Speech is
monotonic and roughly uniform in rate, so the target of output position i of M (text tokens plus
end-of-text) lies near the same fraction of the T encoder frames. The guided-attention loss of
Tachibana et al. (2018, "Efficiently trainable text-to-speech system based on deep convolutional
networks with guided attention") charges each attention weight for its distance from that
diagonal:

    W[i, t] = 1 - exp(-((i + 1/2) / M - (t + 1/2) / T)^2 / (2 sigma^2))
    loss    = mean over target rows, heads and decoder layers of  sum_t A[i, t] W[i, t]

so a row whose attention lies on the diagonal costs ~0 and one spread uniformly costs ~0.75 (at
sigma 0.2). Nothing changes at inference: the loss only shapes the weights during training.
Prompt rows (those before the first target) carry no loss, exactly as in the cross-entropy.

The diagonal is only roughly where a token is: words differ in length and speech pauses. Given
where each token actually is (``centres``: the CTC head's own forced alignment of the transcript,
``speedasr.nn.ctc_alignment``, with ``model.guided_attention: ctc``), row i is centred on text
token i's frames with a band of a frame or two, and the end-of-text row on the last frame.

Cost: the attention weights are recomputed from the same queries and keys on a padded
``(B, H, L, T')`` grid, beside the packed attention itself (whose kernels never materialise
them): ~B * H * L * T' floats per decoder layer, small next to the model for the batch sizes it
is meant for (turning on alignment early in training from scratch), and zero when it is off.
"""

from __future__ import annotations

import math

import torch

from speedasr.core.segments import Segments


class AlignmentPrior:
    """Accumulates the guided-attention loss of the cross-attention calls of one forward pass.

    Args:
        token_segments: the decoder's token sequences (prompt + text) per utterance.
        memory_segments: the encoder frames per utterance.
        prompt_lengths: prompt tokens per utterance; the query at position ``p - 1 + i``
            predicts target ``i`` (the last target is end-of-text).
        sigma: width of the diagonal band, as a fraction of the utterance (0.2: Tachibana's).
        centres: ``(B, N)`` where each text token is, in encoder frames (e.g. a CTC forced
            alignment, ``speedasr.nn.ctc_alignment``); None: the diagonal.
        aligned: ``(B,)`` bool, which utterances ``centres`` holds (the others keep the
            diagonal); None: all.
        centre_sigma: the band around ``centres``, in frames; the end-of-text row is then
            centred on the last frame.
    """

    def __init__(
        self,
        token_segments: Segments,
        memory_segments: Segments,
        prompt_lengths: tuple[int, ...],
        sigma: float,
        centres: torch.Tensor | None = None,
        aligned: torch.Tensor | None = None,
        centre_sigma: float = 1.0,
    ) -> None:
        if sigma <= 0 or centre_sigma <= 0:
            raise ValueError(f"guided attention sigma must be > 0, got {sigma} / {centre_sigma}")
        self.tokens, self.memory = token_segments, memory_segments
        device = token_segments.positions.device
        lengths = torch.tensor(token_segments.lengths, device=device, dtype=torch.float32)
        frames = torch.tensor(memory_segments.lengths, device=device, dtype=torch.float32)
        first = torch.tensor(prompt_lengths, device=device, dtype=torch.float32) - 1
        targets = lengths - first  # M: text tokens + end-of-text
        rows = torch.arange(token_segments.max_seqlen, device=device, dtype=torch.float32)
        cols = torch.arange(memory_segments.max_seqlen, device=device, dtype=torch.float32)
        # (B, L): which query rows predict a target, and where along the utterance they are
        target_row = (rows[None] >= first[:, None]) & (rows[None] < lengths[:, None])
        target_row &= (frames > 0)[:, None]  # an utterance with no frame has nothing to align
        index = rows[None] - first[:, None]  # target index i of each row
        # the diagonal, in frames: (i + 1/2) / M = (c + 1/2) / T, with a band of sigma * T frames
        centre = (index + 0.5) * frames[:, None] / targets.clamp(min=1)[:, None] - 0.5
        width = (sigma * frames)[:, None].expand_as(centre)
        if centres is not None:  # (B, N) token centres: row i < N is text token i
            n = centres.shape[1]
            ok = target_row if aligned is None else target_row & aligned[:, None]
            text_row = ok & (index < n) & (index < targets[:, None] - 1)
            if n == 0:  # no text in the batch: only end-of-text rows
                found = torch.zeros_like(centre)
            else:
                found = centres.gather(1, index.long().clamp(0, n - 1))
            centre = torch.where(text_row, found, centre)
            width = torch.where(text_row, torch.full_like(width, centre_sigma), width)
            end_row = ok & (index == targets[:, None] - 1)  # end-of-text: the last frame
            centre = torch.where(end_row, frames[:, None] - 1, centre)
            width = torch.where(end_row, torch.full_like(width, centre_sigma), width)
        distance = cols[None, None, :] - centre[:, :, None]  # (B, L, T')
        weight = 1 - torch.exp(-(distance**2) / (2 * width[:, :, None] ** 2))
        key_real = cols[None] < frames[:, None]
        self.weight = (weight * target_row[:, :, None] * key_real[:, None, :])[:, None]
        self.key_real = key_real[:, None, None, :]  # (B, 1, 1, T')
        self.num_rows = int(target_row.sum())
        self.total: torch.Tensor | None = None
        self.calls = 0

    def add(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One cross-attention call: ``q`` ``(ΣL, H, Dh)`` or ``(B, L, H, Dh)``, ``k`` likewise
        over frames, before the softmax scale (the default ``1 / √Dh`` is applied here)."""
        if q.ndim == 3:
            q, k = self.tokens.pad(q), self.memory.pad(k)
        q = q[:, : self.tokens.max_seqlen].float()
        k = k[:, : self.memory.max_seqlen].float()
        scores = torch.einsum("blhd,bthd->bhlt", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.key_real, torch.finfo(scores.dtype).min)
        cost = (scores.softmax(-1) * self.weight).sum() / max(self.num_rows * q.shape[2], 1)
        self.total = cost if self.total is None else self.total + cost
        self.calls += 1

    def loss(self) -> torch.Tensor:
        """Mean cost per target row, head and layer (0 when nothing was added)."""
        if self.total is None:
            return self.weight.new_zeros(())
        return self.total / self.calls
