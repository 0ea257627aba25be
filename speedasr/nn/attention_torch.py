"""Pure-PyTorch attention for packed (THD) and padded sequences: the CPU path and the reference.

Packed inputs are computed by *grouping*: segments of similar shape are gathered into a few small
dense batches, each run through one ``scaled_dot_product_attention`` call with a boolean mask, and
the real rows are scattered back. A per-utterance loop costs one Python call (and a tiny matmul) per
utterance; one dense call over the whole batch pays for all the padding. Grouping sorts segments by
length and closes a group when its padded area would exceed the real area by more than a slack, so
a batch costs a handful of calls and little padding (``python -m speedasr.bench.torch_attention``
measures it).

Semantics (shared with every backend, see ``speedasr.nn.attention``): causal masking is bottom-right
aligned, query ``j`` of a segment with ``Lq`` queries and ``Lk`` keys sees keys ``<= j + Lk - Lq``;
a query row that sees no key outputs zeros and gets zero gradients (never NaN). Padding rows read a
zero row, never another utterance's data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F

GROUP_SLACK = 0.25
"""A group may compute up to this fraction more score entries than its segments really need..."""
GROUP_MIN_AREA = 16384
"""...plus this many entries (~128²): below it, another SDPA call costs more than the padding."""


def torch_packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Packed attention: ``q: (ΣLq, H, D)``, ``k, v: (ΣLk, H, D)`` -> ``(ΣLq, H, D)``.

    ``cu_seqlens_*`` are read on the host once per call (the CPU path has no sync to avoid).
    ``max_seqlen_*`` are accepted for signature parity with the GPU kernels and not needed here.
    ``rel_pos``: ``(query_pos (ΣLq, H, D), table (2R - 1, H, D))`` with ``R >=`` every segment's
    length, adds the relative-position term (module docstring).
    """
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (Nq,H,D), k=v (Nk,H,D); got {q.shape}, {k.shape}, {v.shape}")
    offsets_q = cu_seqlens_q.tolist()
    offsets_k = cu_seqlens_k.tolist()
    if len(offsets_q) != len(offsets_k):
        raise ValueError(
            f"{len(offsets_q) - 1} query segments but {len(offsets_k) - 1} key segments"
        )
    if offsets_q[-1] != q.shape[0] or offsets_k[-1] != k.shape[0]:
        raise ValueError("cu_seqlens do not end at the number of packed rows")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    total_q, heads, dim = q.shape
    if total_q == 0:
        return q.new_zeros(q.shape)
    plan = _plan(tuple(offsets_q), tuple(offsets_k), causal, q.device)
    # One index_select per tensor gathers every group, from the packed rows plus one zero row that
    # padding slots read (never another utterance's rows); one more scatters the outputs back.
    # Their backwards are index_adds: per-group gathers, or ``x[idx]`` (an accumulating index_put
    # backward), cost as much as the attention itself on CPU.
    gathers = [(q, plan.index_q), (k, plan.index_k), (v, plan.index_k)]
    if rel_pos is not None:
        longest = max((max(tq, tk) for _, tq, tk in plan.shapes), default=0)
        _check_rel_pos(rel_pos, q.shape, longest)
        gathers.append((rel_pos[0], plan.index_q))
    q_all, k_all, v_all, *qp_all = (
        torch.cat([t, t.new_zeros(1, heads, dim)]).index_select(0, idx) for t, idx in gathers
    )
    qp_groups = qp_all[0].split(plan.sizes_q) if rel_pos is not None else [None] * len(plan.sizes_q)
    outputs = []
    for (n, tq, tk), (mask, has_key), qg, kg, vg, qpg in zip(
        plan.shapes, plan.masks, q_all.split(plan.sizes_q), k_all.split(plan.sizes_k),
        v_all.split(plan.sizes_k), qp_groups, strict=True,
    ):  # fmt: skip
        qg, kg, vg = (t.view(n, -1, heads, dim).transpose(1, 2) for t in (qg, kg, vg))
        if qpg is not None:
            qpg = qpg.view(n, tq, heads, dim).transpose(1, 2)
            mask = relative_score_mask(qpg, rel_pos[1], tk, scale, mask)
        out = masked_sdpa(qg, kg, vg, mask, has_key, scale)  # (n, H, Tq, D)
        outputs.append(out.transpose(1, 2).flatten(0, 1))
    return torch.cat(outputs).index_select(0, plan.source)


class _Plan(NamedTuple):
    """How one batch shape is computed: groups, gather/scatter indices and masks (on device)."""

    shapes: list[tuple[int, int, int]]  # per group: (segments, max queries, max keys)
    sizes_q: list[int]
    sizes_k: list[int]
    index_q: torch.Tensor  # (Σ n·Tq,) rows of q (or the zero row) in group-padded order
    index_k: torch.Tensor
    masks: list[tuple[torch.Tensor | None, torch.Tensor | None]]
    source: torch.Tensor  # (ΣLq,) slot of every packed query row among the group outputs


@functools.lru_cache(maxsize=16)
def _plan(
    offsets_q: tuple[int, ...], offsets_k: tuple[int, ...], causal: bool, device: torch.device
) -> _Plan:
    """Cached per batch shape: every layer of a batch (and its backward) reuses one plan.

    Built outside inference mode: a plan first made during validation (Lightning runs it under
    ``torch.inference_mode``) must stay usable by autograd in a later training step.
    """
    with torch.inference_mode(False):
        return _build_plan(offsets_q, offsets_k, causal, device)


def _build_plan(
    offsets_q: tuple[int, ...], offsets_k: tuple[int, ...], causal: bool, device: torch.device
) -> _Plan:
    lq = [b - a for a, b in pairwise(offsets_q)]
    lk = [b - a for a, b in pairwise(offsets_k)]
    total_q, total_k = offsets_q[-1], offsets_k[-1]
    groups = plan_groups(lq, lk)
    shapes = [(len(g), max(lq[i] for i in g), max(lk[i] for i in g)) for g in groups]
    index_q = torch.cat(
        [_gather_index([offsets_q[i] for i in g], [lq[i] for i in g], tq, total_q)
         for g, (_, tq, _) in zip(groups, shapes, strict=True)]
    )  # fmt: skip
    index_k = torch.cat(
        [_gather_index([offsets_k[i] for i in g], [lk[i] for i in g], tk, total_k)
         for g, (_, _, tk) in zip(groups, shapes, strict=True)]
    )  # fmt: skip
    real = (index_q < total_q).nonzero().squeeze(1)
    source = torch.empty(total_q, dtype=torch.int64)
    source[index_q[real]] = real
    masks = [
        dense_attention_mask([lq[i] for i in g], [lk[i] for i in g], tq, tk, causal, device)
        for g, (_, tq, tk) in zip(groups, shapes, strict=True)
    ]
    return _Plan(
        shapes=shapes,
        sizes_q=[n * tq for n, tq, _ in shapes],
        sizes_k=[n * tk for n, _, tk in shapes],
        index_q=index_q.to(device),
        index_k=index_k.to(device),
        masks=masks,
        source=source.to(device),
    )


def torch_padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths_q: Sequence[int],
    lengths_k: Sequence[int],
    causal: bool = False,
    softmax_scale: float | None = None,
    mask: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Padded attention: ``q: (B, Tq, H, D)``, ``k, v: (B, Tk, H, D)`` -> ``(B, Tq, H, D)``.

    Rows past ``lengths_q[b]`` hold finite junk (callers mask them); keys past ``lengths_k[b]`` are
    never attended. ``mask`` is a precomputed ``dense_attention_mask(...)`` (layers reuse one per
    batch); by default it is built here. ``rel_pos``: ``(query_pos (B, Tq, H, D), table
    (2R - 1, H, D))``, ``R >= max(Tq, Tk)``: the relative-position term (module docstring).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if mask is None:
        mask = dense_attention_mask(lengths_q, lengths_k, q.shape[1], k.shape[1], causal, q.device)
    bool_mask, has_key = mask
    if rel_pos is not None:
        _check_rel_pos(rel_pos, q.shape, max(q.shape[1], k.shape[1]))
        bool_mask = relative_score_mask(
            rel_pos[0].transpose(1, 2), rel_pos[1], k.shape[1], scale, bool_mask
        )
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = masked_sdpa(qt, kt, vt, bool_mask, has_key, scale)
    return out.transpose(1, 2)


def relative_score_mask(
    query_pos: torch.Tensor,
    table: torch.Tensor,
    tk: int,
    scale: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The relative-position term as an additive SDPA mask: ``(B, H, Tq, tk)`` in q's dtype.

    ``query_pos: (B, H, Tq, D)``, ``table: (2R - 1, H, D)`` (row ``m``: distance ``R - 1 - m``).
    Entry ``(i, j)`` is ``scale · query_pos[i] · table[R - 1 - (i - j)]``, and ``-inf`` where the
    boolean ``mask`` (``(B, 1, Tq, tk)``, True = attend) is False.

    One matmul against the ``Tq + tk - 1`` rows of distances ``Tq - 1 .. -(tk - 1)``, then the
    Transformer-XL shift as a strided view: in the row-major ``(Tq, W)`` product (``W = Tq + tk``,
    one zero column appended) entry ``(i, j)`` lies at flat offset ``Tq - 1 + i·(W - 1) + j``.
    """
    tq = query_pos.shape[2]
    r = (table.shape[0] + 1) // 2
    rows = table[r - tq : r + tk - 1].transpose(0, 1)  # (H, Tq + tk - 1, D)
    scores = torch.matmul(query_pos, rows.transpose(-1, -2).unsqueeze(0))  # (B, H, Tq, Tq+tk-1)
    width = tq + tk
    flat = F.pad(scores, (0, 1)).flatten(-2)
    shifted = flat.narrow(-1, tq - 1, tq * (width - 1)).unflatten(-1, (tq, width - 1))[..., :tk]
    bias = shifted * scale
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf"))
    return bias


def _check_rel_pos(
    rel_pos: tuple[torch.Tensor, torch.Tensor], q_shape: torch.Size, longest: int
) -> None:
    query_pos, table = rel_pos
    if query_pos.shape != q_shape:
        raise ValueError(
            f"rel_pos query {tuple(query_pos.shape)} does not match q {tuple(q_shape)}"
        )
    rows = table.shape[0]
    if table.ndim != 3 or table.shape[1:] != q_shape[-2:] or rows % 2 == 0:
        raise ValueError(f"rel_pos table must be (2R-1, H, D) with H, D of q; got {table.shape}")
    if (rows + 1) // 2 < longest:
        raise ValueError(
            f"rel_pos table covers distances up to {(rows - 1) // 2}, but a sequence has "
            f"{longest} positions (needs R >= {longest})"
        )


def plan_groups(
    lengths_q: Sequence[int],
    lengths_k: Sequence[int],
    slack: float = GROUP_SLACK,
    min_area: int = GROUP_MIN_AREA,
) -> list[list[int]]:
    """Partition the non-empty query segments into groups for dense calls (host ints only).

    Segments are sorted by (keys, queries) descending; a group grows while its padded score area
    ``n * max_q * max_k`` stays within ``(1 + slack) * real + min_area``.
    """
    order = sorted(
        (i for i, n in enumerate(lengths_q) if n > 0),
        key=lambda i: (lengths_k[i], lengths_q[i]),
        reverse=True,
    )
    groups: list[list[int]] = []
    cur: list[int] = []
    max_q = max_k = real = 0
    for i in order:
        q, kk = lengths_q[i], max(lengths_k[i], 1)
        new_q, new_k, new_real = max(max_q, q), max(max_k, kk), real + q * kk
        if cur and (len(cur) + 1) * new_q * new_k > (1 + slack) * new_real + min_area:
            groups.append(cur)
            cur, new_q, new_k, new_real = [], q, kk, q * kk
        cur.append(i)
        max_q, max_k, real = new_q, new_k, new_real
    if cur:
        groups.append(cur)
    return groups


def dense_attention_mask(
    lengths_q: Sequence[int],
    lengths_k: Sequence[int],
    tq: int,
    tk: int,
    causal: bool,
    device: torch.device | str,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Boolean mask ``(B, 1, tq, tk)`` (True = attend) and ``has_key (B, 1, tq, 1)``, padded rows.

    Returns ``None`` for the mask when nothing needs masking (all full, not causal), and ``None``
    for ``has_key`` when every row sees at least one key. Rows that see no key are given a full row
    in the mask (keeps softmax finite) and are zeroed afterwards through ``has_key``.
    """
    full = all(n == tq for n in lengths_q) and all(n == tk for n in lengths_k)
    if full and not causal:
        return None, None
    lq = torch.tensor(list(lengths_q), device=device)[:, None, None]
    lk = torch.tensor(list(lengths_k), device=device)[:, None, None]
    qpos = torch.arange(tq, device=device)[None, :, None]
    kpos = torch.arange(tk, device=device)[None, None, :]
    mask = kpos < lk
    if causal:
        mask = mask & (kpos <= qpos + lk - lq)
    mask = mask[:, None]  # (B, 1, tq, tk)
    # A row sees no key only if its segment has no keys, or causal with more queries than keys.
    pairs = zip(lengths_q, lengths_k, strict=True)
    empty_rows = any(nk == 0 or (causal and nq > nk) for nq, nk in pairs)
    if not empty_rows:
        return mask, None
    has_key = mask.any(dim=-1, keepdim=True)
    return mask | ~has_key, has_key


def masked_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    has_key: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``(B, H, Tq, D)`` attention with a boolean mask (or an additive float one, ``-inf`` =
    masked: the relative-position term); rows with ``has_key == False`` are zero.

    The multiplication by ``has_key`` also zeroes those rows' gradients (to q, k and v alike).
    """
    if k.shape[2] == 0:  # no keys anywhere in this batch
        return q.new_zeros(q.shape) + 0.0 * q
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if has_key is not None:
        out = out * has_key.to(out.dtype)
    return out


def per_utterance_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The naive strategy: one dense call per utterance (benchmark baseline and test oracle)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    oq, ok = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for i in range(len(oq) - 1):
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[oq[i] : oq[i + 1]],
                                                          k[ok[i] : ok[i + 1]],
                                                          v[ok[i] : ok[i + 1]]))  # fmt: skip
        nq, nk = qi.shape[2], ki.shape[2]
        mask = dense_attention_mask([nq], [nk], nq, nk, causal, q.device)
        outs.append(masked_sdpa(qi, ki, vi, *mask, scale)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _gather_index(starts: list[int], lengths: list[int], width: int, pad_row: int) -> torch.Tensor:
    """Flat ``(n * width,)`` row indices of n segments padded to ``width`` (``pad_row`` past each
    length), built on the host from host ints."""
    start = torch.tensor(starts)[:, None]
    pos = torch.arange(width)[None, :]
    return torch.where(pos < torch.tensor(lengths)[:, None], start + pos, pad_row).flatten()
