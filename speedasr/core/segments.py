"""The one descriptor of a packed batch of variable-length sequences.

A packed tensor concatenates B sequences along its first axis: ``x: (total, ...)`` where
``total = sum(lengths)``. ``Segments`` holds everything layers need to treat each sequence
separately. It is built once per batch (in the collator, or once per stage inside the model) and
reused by every layer, so no layer recomputes offsets or synchronizes with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Offsets and per-position indices of B packed sequences.

    Attributes:
        lengths: host ints, one per sequence (zero allowed).
        cu_seqlens: ``(B + 1,)`` int32 on the data's device; ``cu_seqlens[i]`` is where sequence i
            starts, ``cu_seqlens[-1] == total``.
        max_seqlen: host int, ``max(lengths)`` (0 for an empty batch).
        positions: ``(total,)`` int64, index of each position inside its own sequence (resets to 0
            at every sequence start).
        segment_ids: ``(total,)`` int64, which sequence each position belongs to.
    """

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    positions: torch.Tensor
    segment_ids: torch.Tensor

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], device: torch.device | str | None = None
    ) -> Segments:
        lengths = tuple(int(n) for n in lengths)
        if any(n < 0 for n in lengths):
            raise ValueError(f"segment lengths must be >= 0, got {lengths}")
        lens = torch.tensor(lengths, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        total = int(cu[-1])
        segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), lens)
        positions = torch.arange(total) - cu[:-1].repeat_interleave(lens)
        return cls(
            lengths=lengths,
            cu_seqlens=cu.to(torch.int32).to(device),
            max_seqlen=max(lengths, default=0),
            positions=positions.to(device),
            segment_ids=segment_ids.to(device),
        )

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> list[int]:
        """Host copy of ``cu_seqlens`` (no device sync: computed from ``lengths``)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def to(self, device: torch.device | str) -> Segments:
        return Segments(
            lengths=self.lengths,
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            positions=self.positions.to(device, non_blocking=True),
            segment_ids=self.segment_ids.to(device, non_blocking=True),
        )

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Packed ``(total, ...)`` -> list of B tensors ``(length_i, ...)`` (views)."""
        return list(torch.split(x, list(self.lengths)))

    def pad(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """Packed ``(total, ...)`` -> padded ``(B, max_seqlen, ...)``."""
        out = x.new_full((self.batch_size, self.max_seqlen, *x.shape[1:]), value)
        out[self.segment_ids, self.positions] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """Padded ``(B, T >= max_seqlen, ...)`` -> packed ``(total, ...)``."""
        return x[self.segment_ids, self.positions]

    def mask(self) -> torch.Tensor:
        """``(B, max_seqlen)`` bool, True at real positions (for the padded layout)."""
        lens = torch.tensor(self.lengths, device=self.positions.device)
        return torch.arange(self.max_seqlen, device=lens.device)[None, :] < lens[:, None]
