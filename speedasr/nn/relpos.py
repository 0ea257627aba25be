"""Transformer-XL relative positions (NeMo's ``rel_pos`` encoders), packed or padded.

Score of query ``i`` and key ``j`` of one utterance (Dai et al. 2019, §3.3; NeMo's
``RelPositionMultiHeadAttention``, docs/canary.md §4.5)::

    ((q_i + u) · k_j + (q_i + v) · W_pos e(i - j)) / √d_head

with ``u = pos_bias_u``, ``v = pos_bias_v`` (``(H, d_head)``, per layer), ``W_pos`` = ``linear_pos``
(no bias) and ``e(p)`` the interleaved sinusoid of the relative distance ``p`` (positive: the key
lies in the past). Positions are inside each utterance, so the term depends only on ``i - j``:
packed rows and padded rows see exactly what each utterance sees alone.

The table holds the ``2R - 1`` distances ``R - 1, ..., -(R - 1)`` in descending order (NeMo's
layout, so ``linear_pos`` weights need no permutation); ``R`` is the longest sequence of the batch.
The attention itself is ``speedasr.nn.attention`` with ``rel_pos=RelativePositions(...)``: the
pure-PyTorch path, or the Triton kernels on CUDA (docs/kernels.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from speedasr.nn.positions import sinusoidal_positions

if TYPE_CHECKING:
    from speedasr.nn.layout import Layout


def relative_sinusoids(longest: int, dim: int, device: torch.device | str | None = None):
    """``(2R - 1, dim)`` float32, ``R = max(longest, 1)``: row ``m`` is the sinusoid of the relative
    distance ``R - 1 - m`` (channel ``2c``: ``sin(p·ω_c)``, ``2c + 1``: ``cos(p·ω_c)``,
    ``ω_c = 10000^(-2c/dim)``, products in float32 as in NeMo's ``RelPositionalEncoding``)."""
    r = max(longest, 1)
    distances = torch.arange(r - 1, -r, -1, device=device)
    return sinusoidal_positions(distances, dim)


class RelPositionSelfAttention(nn.Module):
    """Encoder self-attention with Transformer-XL relative positions (not causal).

    ``x: (N, D)`` packed or ``(B, T, D)`` padded -> same shape. Parameters: ``qkv`` (the q, k, v
    projections fused, with bias; NeMo's separate ``linear_q/k/v`` map onto its three row blocks),
    ``proj`` (NeMo's ``linear_out``), ``linear_pos`` (no bias) and ``pos_bias_u``, ``pos_bias_v``
    ``(H, d_head)``, zero at init as in NeMo.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        from speedasr.nn.attention import RelativePositions

        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        sinusoids = layout.relative_sinusoids(self.heads * self.head_dim).to(x.dtype)
        table = self.linear_pos(sinusoids).unflatten(-1, (self.heads, self.head_dim))
        # The biases follow q's dtype: under autocast q is bf16/fp16 while the parameters stay
        # fp32, and fp32 + bf16 would promote the queries, leaving q, k, v in mixed dtypes that
        # no attention kernel takes (the torch path's SDPA would cast them down anyway).
        u, v_bias = self.pos_bias_u.to(q.dtype), self.pos_bias_v.to(q.dtype)
        rel_pos = RelativePositions(q + v_bias, table)
        out = layout.attend(q + u, k, v, layout, causal=False, rel_pos=rel_pos)
        return self.proj(out.flatten(-2))
