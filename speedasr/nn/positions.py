"""Fixed sinusoidal absolute positions (Vaswani et al. 2017), restarting at every utterance.

The decoder can add them to its token embeddings (Canary's decoder embedding) and to the encoder
output that cross-attention reads (``ModelConfig.absolute_token_positions`` /
``absolute_memory_positions``). Rotary positions (``speedasr.nn.rotary``) stay in self-attention;
these give cross-attention, which has no notion of distance between a token and a frame, a
position signal on both sides, so it can align by position as well as by content. Positions come
from the batch descriptor, as for rotary, so packed rows see what each utterance sees alone.
"""

from __future__ import annotations

import math

import torch


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(*positions.shape, dim)`` float32 table: channel ``2i`` is ``sin(p / 10000^(2i/dim))``,
    channel ``2i + 1`` the matching cosine (interleaved, the layout of NeMo's
    ``FixedPositionalEncoding``). Values lie in [-1, 1]; callers scale them."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {dim}")
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
        * (-math.log(10000.0) / dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
