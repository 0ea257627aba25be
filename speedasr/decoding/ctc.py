"""Greedy CTC decoding of the encoder's CTC head (hybrid CTC/attention models).

No decoder runs: per encoder frame the most likely label, then repeats merged and blanks removed
(the CTC collapse). One matmul and one argmax for the whole packed batch; the collapse runs on the
packed label sequence at once. It reads what the encoder alone has learned, so it is also the way
to see whether the encoder aligns before the attention decoder does.
"""

from __future__ import annotations

import torch

from speedasr.core.segments import Segments
from speedasr.decoding.options import DecodingOptions


class CtcGreedySearch:
    """``DecodingOptions(method="ctc")``: best path of the CTC head, collapsed."""

    def __init__(self, options: DecodingOptions) -> None:
        self.options = options

    def search(
        self, model, enc: torch.Tensor, enc_segments: Segments, prompts: list[list[int]],
        eot_id: int, limits: torch.Tensor,
    ) -> list[list[int]]:  # fmt: skip
        """``enc: (ΣT', D)`` packed encoder output -> label ids per utterance (at most
        ``limits[i]`` each). Prompts and end-of-text do not apply: CTC has neither."""
        blank = model.cfg.pad_id
        best = model.ctc_log_probs(enc).argmax(-1)  # (ΣT',)
        # A frame emits its label if it is not blank and differs from the previous frame of the
        # same utterance (the first frame of every utterance always starts a new run).
        new_run = torch.ones_like(best, dtype=torch.bool)
        new_run[1:] = best[1:] != best[:-1]
        new_run |= enc_segments.positions == 0
        emit = new_run & (best != blank)
        per_utt = [ids.tolist() for ids in torch.split(best[emit], _counts(emit, enc_segments))]
        return [ids[: int(n)] for ids, n in zip(per_utt, limits.tolist(), strict=True)]


def _counts(emit: torch.Tensor, segments: Segments) -> list[int]:
    """Emitted labels per utterance: ``(B,)`` host ints."""
    counts = torch.zeros(segments.batch_size, dtype=torch.long, device=emit.device)
    counts.index_add_(0, segments.segment_ids, emit.long())
    return counts.tolist()
