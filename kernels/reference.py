"""Pure-PyTorch reference for packed (varlen) attention: the semantics kernels are tested against.

Deliberately simple: one Python loop over sequences, explicit boolean masks, ``softmax`` from
PyTorch. It is slow (it reads the offsets on the host) and meant for tests and debugging, not for
training; the fast CPU path is ``speedasr.nn.attention_torch``.

Semantics (the same as ``speedasr.nn.attention.packed_attention``):
  - sequence ``i`` owns rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and
    ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k and v;
  - causal masking is bottom-right aligned: query ``j`` of a sequence with ``Lq`` queries and ``Lk``
    keys sees keys ``n <= j + Lk - Lq``;
  - a query that sees no key (empty key segment, or causal with ``Lq > Lk``) outputs zeros, has
    log-sum-exp ``+inf`` and gets zero gradients, never NaN;
  - relative positions (``rel_pos=(query_pos, table)``, Transformer-XL as in NeMo's ``rel_pos``):
    the score of query ``i`` and key ``j`` (positions inside their sequence) gets
    ``+ softmax_scale * query_pos[i] . table[R - 1 - (i - j)]``, ``table: (2R - 1, H, D)``.
"""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    upcast: bool = True,
    return_lse: bool = False,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference attention over packed sequences; differentiable with ordinary autograd.

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, H, D)``.
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` integer offsets, starting at 0.
        causal: bottom-right aligned causal mask.
        softmax_scale: defaults to ``1/sqrt(D)``.
        upcast: compute in fp32 and return fp32 (the reference). ``False`` computes in the input
            dtype throughout and returns that dtype ("plain PyTorch in the same dtype", the error
            baseline kernels are compared with).
        return_lse: also return the natural-log log-sum-exp of the scaled scores, ``(H, total_q)``
            fp32, ``+inf`` for queries that see no key.
        rel_pos: ``(query_pos (total_q, H, D), table (2R - 1, H, D))``: adds the relative-position
            term (module docstring), gathered row by row from the table (no shift trick).

    Returns:
        ``(total_q, H, D)`` output (and the log-sum-exp when ``return_lse``).
    """
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if rel_pos is not None:
        query_pos, table = (t.to(dtype) for t in rel_pos)
        r = (table.shape[0] + 1) // 2
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    offs_q = cu_seqlens_q.tolist()
    offs_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(offs_q) - 1):
        qi = q[offs_q[i] : offs_q[i + 1]].transpose(0, 1)  # (H, Lq, D)
        ki = k[offs_k[i] : offs_k[i + 1]].transpose(0, 1)  # (H, Lk, D)
        vi = v[offs_k[i] : offs_k[i + 1]].transpose(0, 1)
        len_q, len_k = qi.shape[1], ki.shape[1]
        scores = torch.matmul(qi, ki.transpose(1, 2)) * scale  # (H, Lq, Lk)
        if rel_pos is not None:
            qpi = query_pos[offs_q[i] : offs_q[i + 1]]  # (Lq, H, D)
            rows = torch.arange(len_q, device=q.device)[:, None]
            cols = torch.arange(len_k, device=q.device)[None, :]
            rel = table[r - 1 - (rows - cols)]  # (Lq, Lk, H, D): the row of each distance i - j
            scores = scores + torch.einsum("ihd,ijhd->hij", qpi, rel) * scale
        mask = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
        if causal:
            rows = torch.arange(len_q, device=q.device)[:, None]
            cols = torch.arange(len_k, device=q.device)[None, :]
            mask = cols <= rows + (len_k - len_q)
        row_has_key = mask.any(dim=1)  # (Lq,)
        # Fully masked rows get scores 0 (not -inf) before the softmax so neither the forward nor
        # the softmax backward sees -inf - -inf = NaN; the mask multiply then zeroes them exactly.
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(row_has_key[:, None], scores, torch.zeros_like(scores))
        probs = torch.softmax(scores, dim=-1) * mask
        outs.append(torch.matmul(probs, vi).transpose(0, 1))  # (Lq, H, D)
        if return_lse:
            lse = torch.logsumexp(scores.float(), dim=-1)
            lses.append(torch.where(row_has_key, lse, torch.full_like(lse, float("inf"))))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(q.shape[1], 0, dtype=torch.float32)
    return out, lse
