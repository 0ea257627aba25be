"""Rotary position embeddings (RoPE) with positions that reset at every utterance.

Positions come from the batch descriptor (``Segments.positions`` for packed rows, ``arange(T)`` for
padded rows), so a packed utterance sees exactly the rotations it would see alone. Rotary encodes
*relative* offsets inside an attention product, so it needs no learned table and no maximum length.
It is applied to self-attention only; cross-attention compares token and frame positions, which
live on different axes and carry no shared notion of distance.
"""

from __future__ import annotations

import torch


def rotary_tables(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(*positions.shape, head_dim // 2)`` for integer ``positions``.

    Computed in float32 (positions up to ~1e5 keep full precision), then cast to ``dtype``.
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    if dtype is not None:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: (..., H, D)`` by ``cos, sin: (..., D/2)`` (leading dims broadcast with x's).

    Pairs channel ``j`` with channel ``j + D/2`` (the "rotate half" layout): one slice and one
    concatenation, no interleaved strides.
    """
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
