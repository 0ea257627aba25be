"""How a batch of sequences is laid out, as seen by layers: packed rows, or padded rows with masks.

Most layers (linear, norms, activations) act on each position alone and never look at the layout.
The few that mix positions ask the layout object, so every layer is written once and runs packed or
padded:

- ``attend(q, k, v, keys, causal)``: attention inside each sequence (self or cross);
- ``rotary(head_dim, base)``: RoPE tables from per-sequence positions;
- ``relative_sinusoids(dim)``: the Transformer-XL table of relative distances (``nn.relpos``);
- ``depthwise_conv(x, conv)``: a "same" 1D convolution along time that never crosses sequences.

A layout is built once per batch and stage (encoder frames, decoder tokens) and caches what it
derives (rotary tables, masks, scatter indices), so ``N`` layers share one computation.
"""

from __future__ import annotations

import torch
from torch import nn

from speedasr.core.segments import Segments
from speedasr.nn.attention import AttentionBackend, RelativePositions, packed_attention
from speedasr.nn.attention_torch import dense_attention_mask, torch_padded_attention
from speedasr.nn.relpos import relative_sinusoids
from speedasr.nn.rotary import rotary_tables


class PackedLayout:
    """Rows of B sequences concatenated: tensors are ``(N, ...)`` with ``N = Σ lengths``."""

    packed = True

    def __init__(self, segments: Segments, backend: AttentionBackend = "auto") -> None:
        self.segments = segments
        self.backend = backend
        self._cache: dict = {}

    @property
    def positions(self) -> torch.Tensor:
        """``(N,)`` int64: each row's position inside its own sequence."""
        return self.segments.positions

    def rotary(self, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: (N, head_dim/2)`` at each row's position inside its sequence."""
        key = ("rotary", head_dim, base)
        if key not in self._cache:
            self._cache[key] = rotary_tables(self.segments.positions, head_dim, base)
        return self._cache[key]

    def relative_sinusoids(self, dim: int) -> torch.Tensor:
        """``(2R - 1, dim)`` float32 sinusoids of the distances ``R - 1 .. -(R - 1)``, R the
        longest sequence (``speedasr.nn.relpos``)."""
        key = ("relative", dim)
        if key not in self._cache:
            self._cache[key] = relative_sinusoids(
                self.segments.max_seqlen, dim, self.segments.positions.device
            )
        return self._cache[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: PackedLayout, causal: bool,
        rel_pos: RelativePositions | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``q: (Nq, H, D)``, ``k, v: (Nk, H, D)`` laid out by ``keys`` -> ``(Nq, H, D)``."""
        s, t = self.segments, keys.segments
        return packed_attention(
            q, k, v, s.cu_seqlens, t.cu_seqlens, s.max_seqlen, t.max_seqlen,
            causal=causal, backend=self.backend, rel_pos=rel_pos,
        )  # fmt: skip

    def depthwise_conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Same-length depthwise convolution ``(N, C) -> (N, C)`` over each sequence alone.

        The rows are scattered into a zero stream with ``padding`` zeros between sequences (the
        zeros each sequence would see alone at its edges), convolved once, and gathered back.
        """
        if x.shape[0] == 0:
            return x.clone()
        pad = conv.padding[0]
        index, stream_length = self._stream_index(pad)
        stream = x.new_zeros(stream_length, x.shape[1]).index_copy(0, index, x)
        y = conv(stream.t().unsqueeze(0))[0]  # (C, L)
        return y.t().index_select(0, index)

    def _stream_index(self, gap: int) -> tuple[torch.Tensor, int]:
        key = ("stream", gap)
        if key not in self._cache:
            starts, pos = [], 0
            for n in self.segments.lengths:
                starts.append(pos)
                pos += n + gap
            device = self.segments.positions.device
            start = torch.tensor(starts, dtype=torch.int64, device=device)
            index = start[self.segments.segment_ids] + self.segments.positions
            self._cache[key] = (index, max(pos - gap, 0))
        return self._cache[key]


class PaddedLayout:
    """B sequences right-padded to a common length: tensors are ``(B, T, ...)``."""

    packed = False

    def __init__(self, segments: Segments, length: int | None = None) -> None:
        self.segments = segments
        self.length = segments.max_seqlen if length is None else length
        if self.length < segments.max_seqlen:
            raise ValueError(
                f"padded length {self.length} < longest sequence {segments.max_seqlen}"
            )
        self._cache: dict = {}

    @property
    def mask(self) -> torch.Tensor:
        """``(B, T)`` bool, True at real positions."""
        if "mask" not in self._cache:
            device = self.segments.positions.device
            lengths = torch.tensor(self.segments.lengths, device=device, dtype=torch.int64)
            self._cache["mask"] = torch.arange(self.length, device=device)[None] < lengths[:, None]
        return self._cache["mask"]

    @property
    def positions(self) -> torch.Tensor:
        """``(T,)`` int64 ``0..T-1``: every sequence starts at position 0 (broadcasts over B)."""
        return torch.arange(self.length, device=self.segments.positions.device)

    def rotary(self, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: (T, head_dim/2)``; every sequence starts at position 0."""
        key = ("rotary", head_dim, base)
        if key not in self._cache:
            self._cache[key] = rotary_tables(self.positions, head_dim, base)
        return self._cache[key]

    def relative_sinusoids(self, dim: int) -> torch.Tensor:
        """``(2T - 1, dim)`` float32 sinusoids of the distances ``T - 1 .. -(T - 1)``."""
        key = ("relative", dim)
        if key not in self._cache:
            self._cache[key] = relative_sinusoids(self.length, dim, self.segments.positions.device)
        return self._cache[key]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: PaddedLayout, causal: bool,
        rel_pos: RelativePositions | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``q: (B, Tq, H, D)``, ``k, v: (B, Tk, H, D)`` -> ``(B, Tq, H, D)``, masked densely."""
        key = ("mask", id(keys), causal)
        if key not in self._cache:
            self._cache[key] = dense_attention_mask(
                self.segments.lengths, keys.segments.lengths, self.length, keys.length, causal,
                q.device,
            )  # fmt: skip
        return torch_padded_attention(
            q, k, v, self.segments.lengths, keys.segments.lengths, causal, mask=self._cache[key],
            rel_pos=rel_pos,
        )  # fmt: skip

    def depthwise_conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``; padding frames are zeroed first, so they read as the zeros
        a sequence sees at its edges when alone (they are not zero after a bias or a GLU)."""
        if x.shape[1] == 0:
            return x.clone()
        x = x * self.mask[..., None].to(x.dtype)
        return conv(x.transpose(1, 2)).transpose(1, 2)


Layout = PackedLayout | PaddedLayout
