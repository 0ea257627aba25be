"""Varlen flash-attention for packed sequences: public function, registered op, launchers.

Layers, top to bottom (docs/kernels.md explains the algorithm and how to add a kernel):

- ``flash_attn_varlen(...)``: the function ``packed_attention(backend="triton")`` calls;
  fills in the default softmax scale and calls the registered op.
- ``speedasr::flash_attn_varlen_fwd`` / ``speedasr::flash_attn_varlen_bwd``: ``torch.library``
  custom ops. One autograd formula links them; fake implementations let ``torch.compile`` trace
  through without running Triton.
- ``_launch_fwd`` / ``_launch_bwd``: validate every input (clear ``ValueError`` before any launch),
  build the tile schedule, allocate outputs, launch the kernels of ``flash_varlen_kernels``.

Layout: ``q: (total_q, H, D)``, ``k, v: (total_k, H, D)`` in fp16, bf16 or fp32 (any token/head
strides, unit stride on D); ``cu_seqlens_q/k: (B+1,)`` int32 on q's device; ``max_seqlen_q/k`` host
ints. Causal masking is bottom-right aligned: query ``j`` of a sequence with ``Lq`` queries and
``Lk`` keys sees keys ``<= j + Lk - Lq``; a query that sees no key outputs zeros and gets zero
gradients. The saved log-sum-exp is ``(H, total_q)`` fp32, natural log, ``+inf`` for such queries.

Relative positions (Transformer-XL, NeMo's ``rel_pos``; ``rel_pos=(query_pos, table)``): the score
of query ``i`` and key ``j`` of one sequence (positions inside the sequence) gets
``+ softmax_scale * query_pos[i] . table[R - 1 - (i - j)]``, with ``query_pos: (total_q, H, D)``
and ``table: (2R - 1, H, D)`` in q's dtype, ``R`` at least the longest query or key sequence
(``speedasr.nn.attention_torch.relative_score_mask`` is the same term in PyTorch). Forward and
backward (gradients for q, k, v, query_pos and table) run in the same kernels, compiled with the
``REL_POS`` switch; without it they are the plain kernels. The table's gradient is summed with
fp32 atomics (the rest of the backward stays deterministic).

Tensors must be on CUDA, except under ``TRITON_INTERPRET=1`` (set before triton is imported), where
the interpreter runs the same kernels on CPU tensors; that is how the tests run without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from speedasr.extras import missing_extra

try:
    import triton
    from triton.runtime.jit import JITFunction
except ImportError as e:  # the core install has no triton: say which extra adds it
    raise missing_extra("triton", "attention backend 'triton' (speedasr.kernels)") from e

from . import flash_varlen_kernels as K
from .flash_varlen_checks import (  # noqa: F401  (re-exported: the launchers' limits and checks)
    MAX_HEAD_DIM,
    MAX_HEAD_DIM_FP32,
    SUPPORTED_DTYPES,
    _capturing,
    _check_rel_pos,
    _max_head_dim,
    _version,
    check_inputs,
)

__all__ = ["flash_attn_varlen", "flash_attn_varlen_fwd", "flash_attn_varlen_bwd", "supports"]

# `triton.jit` reads TRITON_INTERPRET when it decorates the kernels (at import), so ask the kernels
# what they became rather than the variable, which may have changed since.
_INTERPRET = not isinstance(K.fwd_kernel, JITFunction)


_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class _Blocks:
    """Tile sizes and warps for one (head dim, dtype).

    Not timed on hardware (no GPU here), but checked by compiling every kernel for sm_80 with the
    bundled ptxas (``python -m speedasr.kernels.compile_check``) and reading its register/spill
    report: the largest power-of-two tiles whose spills stay at zero or a few hundred bytes. The
    forward keeps a query tile, a key and a value tile and an fp32 accumulator live; the backward
    two extra fp32 accumulators (dK and dV, or dQ), so its inner step is half its outer tile.
    fp32 elements and heads wider than 128 double the bytes per tile, so their tiles halve; heads
    wider than 64 need 8 warps to spread the accumulators.
    """

    fwd_m: int  # query rows per forward program
    fwd_n: int  # keys per forward inner step
    bwd_kv: int  # keys per dK/dV program
    bwd_q_step: int  # queries per dK/dV inner step
    bwd_q: int  # query rows per dQ program
    bwd_kv_step: int  # keys per dQ inner step
    num_warps: int
    num_stages: int = 2  # double-buffer the next K/V (or Q/dO) block behind the current matmuls


def supports(q: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether these kernels handle q's dtype and head dim (``packed_attention``'s auto choice);
    ``others`` (k, v, the relative-position tensors) must share q's dtype (e.g. under autocast
    they may not, and then the torch path, which autocast covers, is the one that works)."""
    if q.dim() != 3 or q.dtype not in SUPPORTED_DTYPES:
        return False
    if any(t.dtype != q.dtype for t in others):
        return False
    return 1 <= q.shape[-1] <= _max_head_dim(q.dtype)


def _blocks(head_dim: int, dtype: torch.dtype, rel_pos: bool = False) -> _Blocks:
    warps = 4 if head_dim <= 64 else 8
    if rel_pos:
        # The position term adds a (rows x window) matmul and a tl.gather per step, and the
        # gather is what spills: at the plain tiles ptxas reported 3-10 KB of stack per thread
        # (sm_80). These are the largest tiles at which it reported <= ~300 B for fp16/bf16
        # D <= 128 and fp32 D64 (see docs/kernels.md, "Compile check"); fp32's dQ pass (which
        # also holds dQP and the table-gradient window) needs 16 x 16.
        wide = dtype == torch.float32 or head_dim > 128
        return _Blocks(32, 32, 32, 16, 16 if wide else 32, 16, num_warps=warps)
    if dtype == torch.float32 or head_dim > 128:
        return _Blocks(32, 32, 32, 32, 32, 32, num_warps=warps)
    return _Blocks(64, 64, 64, 32, 64, 32, num_warps=warps)


def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, check_values: bool = True) -> int | None:
    # CPU tensors only when the kernels are interpreted (read at call time: tests patch it)
    return check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, check_values, allow_cpu=_INTERPRET)


def _block_w(block_m: int, block_n: int) -> int:
    # The relative-position window: a (block_m x block_n) tile reads block_m + block_n - 1
    # consecutive table rows (one per query-key distance), rounded up for tl.arange.
    return triton.next_power_of_2(block_m + block_n - 1)


def _block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot needs >= 16 along the reduction; the padding
    # columns are masked to zero on load and never stored.
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """Matmul precision for fp32 inputs (16-bit inputs ignore it).

    fp32 callers asked for fp32 accuracy, which plain TF32 (~1e-3 relative) does not give. On
    NVIDIA, 3xTF32 splits each operand into two TF32 halves and keeps tensor-core speed at ~1e-6
    relative error; "ieee" would fall back to FMA matmuls, which spill registers heavily at these
    tile sizes (seen in ptxas output for sm_80). AMD has no 3xTF32, so it gets "ieee".
    """
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.version.hip else "tf32x3"


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tile_schedule(
    cu: torch.Tensor, cu_other: torch.Tensor, block: int, num_programs: int, heavy_last: bool
) -> torch.Tensor:
    """``(2, num_programs)`` int32: the (sequence, tile) each program works on, ``-1`` if spare.

    Built on the device from the offsets (no host sync). A long-tailed length mix then costs one
    program per real tile plus at most ``B`` spare programs that exit at once, instead of
    ``B * cdiv(max_seqlen, block)`` programs of which most would find no rows. Tiles are ordered
    heaviest first (by the other side's length, which sets the inner loop's trip count), so the
    long tiles start early and short ones fill the gaps at the end (longest-processing-time order).
    With ``heavy_last`` the tiles of a sequence go last to first: a causal query tile sees more
    keys the later it is.
    """
    lengths = (cu[1:] - cu[:-1]).long()
    work = (cu_other[1:] - cu_other[:-1]).long()
    num_seqs = lengths.numel()
    order = torch.argsort(work, descending=True, stable=True)
    tiles = torch.div(lengths + block - 1, block, rounding_mode="floor")[order]
    ends = torch.cumsum(tiles, 0)
    pid = torch.arange(num_programs, device=cu.device)
    slot = torch.searchsorted(ends, pid, right=True)
    spare = slot >= num_seqs
    slot = slot.clamp(max=num_seqs - 1)
    tile = pid - (ends[slot] - tiles[slot])
    if heavy_last:
        tile = tiles[slot] - 1 - tile
    seq = torch.where(spare, -1, order[slot])
    return torch.stack([seq, torch.where(spare, 0, tile)]).to(torch.int32).contiguous()


# Tile schedules, built once per batch like the offset checks: they depend only on the offsets,
# the tile size and the grid, which every layer of a model shares.
_schedules: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _schedule(
    cu: torch.Tensor, cu_other: torch.Tensor, block: int, num_programs: int, heavy_last: bool
) -> torch.Tensor:
    # Which tiles exist depends on `cu` alone; `cu_other` only orders them. So even a stale id of
    # a freed `cu_other` could only cost load balance, never correctness.
    key = (_version(cu), id(cu_other), _version(cu_other), block, num_programs, heavy_last)
    cacheable = None not in key and not _capturing(cu)
    if cacheable and key in _schedules.get(cu, {}):
        return _schedules[cu][key]
    sched = _tile_schedule(cu, cu_other, block, num_programs, heavy_last)
    if cacheable:
        per_offsets = _schedules.setdefault(cu, {})
        if len(per_offsets) >= 16:  # stale versions of offsets modified in place
            per_offsets.clear()
        per_offsets[key] = sched
    return sched


def _num_programs(total: int, num_seqs: int, max_seqlen: int, block: int) -> int:
    # Two upper bounds on sum(cdiv(len_i, block)); the smaller wastes fewer programs.
    return min(triton.cdiv(total, block) + num_seqs, num_seqs * triton.cdiv(max_seqlen, block))


def _rel_args(q, query_pos, table):
    """Kernel arguments of the relative-position term: pointers, strides, R, REL_POS.

    Without rel_pos, q stands in for the pointers (never read: REL_POS=False compiles it out).
    """
    if table is None:
        return (q, q), (0, 0, 0, 0), 0, False
    strides = (query_pos.stride(0), query_pos.stride(1), table.stride(0), table.stride(1))
    return (query_pos, table), strides, (table.shape[0] + 1) // 2, True


def _launch_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, query_pos=None, table=None):
    longest = _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k)
    _check_rel_pos(q, query_pos, table, longest)
    rel_ptrs, rel_strides, rel_r, rel_pos = _rel_args(q, query_pos, table)
    total_q, heads, head_dim = q.shape
    out = torch.empty((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    blocks = _blocks(head_dim, q.dtype, rel_pos)
    num_seqs = cu_q.numel() - 1
    n_prog = _num_programs(total_q, num_seqs, max_q, blocks.fwd_m)
    if n_prog == 0 or heads == 0:
        return out, lse
    sched = _schedule(cu_q, cu_k, blocks.fwd_m, n_prog, heavy_last=causal)
    K.fwd_kernel[(n_prog, heads)](
        q, k, v, out, lse, cu_q, cu_k, sched, *rel_ptrs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), *rel_strides,
        total_q, n_prog, scale * _LOG2E, rel_r,
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n, DOT_PRECISION=_dot_precision(q.dtype),
        REL_POS=rel_pos, BLOCK_W=_block_w(blocks.fwd_m, blocks.fwd_n),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out, lse


def _launch_bwd(
    d_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, query_pos=None, table=None
):
    """``(dq, dk, dv, d_query_pos, d_table)``; the last two are empty without rel_pos."""
    # Offsets were checked by the forward; only the cheap metadata checks run again.
    _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, check_values=False)
    _check_rel_pos(q, query_pos, table, None)
    rel_ptrs, rel_strides, rel_r, rel_pos = _rel_args(q, query_pos, table)
    if d_out.shape != out.shape or d_out.stride(-1) != 1:
        raise ValueError(f"flash_attn_varlen: bad output gradient {tuple(d_out.shape)}")
    total_q, heads, head_dim = q.shape
    total_k = k.shape[0]
    dq = torch.empty((total_q, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((total_k, heads, head_dim), dtype=k.dtype, device=q.device)
    dv = torch.empty((total_k, heads, head_dim), dtype=v.dtype, device=q.device)
    if rel_pos:
        d_query_pos = torch.empty_like(q, memory_format=torch.contiguous_format)
        # fp32 whatever the dtype: programs add their windows into it atomically, cast at the end
        d_table_acc = torch.zeros(table.shape, dtype=torch.float32, device=q.device)
        d_rel_ptrs = (d_query_pos, d_table_acc)
        d_rel_strides = (*d_query_pos.stride()[:2], *d_table_acc.stride()[:2])
    else:
        d_query_pos, d_table_acc = q.new_empty(0), q.new_empty(0)  # two: outputs may not alias
        d_rel_ptrs, d_rel_strides = (q, q), (0, 0, 0, 0)

    def result():
        d_table = d_table_acc.to(table.dtype) if rel_pos else d_table_acc
        return dq, dk, dv, d_query_pos, d_table

    if heads == 0:
        return result()
    blocks = _blocks(head_dim, q.dtype, rel_pos)
    block_d = _block_d(head_dim)
    precision = _dot_precision(q.dtype)
    num_seqs = cu_q.numel() - 1
    common = dict(
        CAUSAL=causal, HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision,
        REL_POS=rel_pos, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip

    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q > 0:
        pre_m = _blocks(head_dim, q.dtype).bwd_q  # rows are rows: one tile size either way
        K.bwd_preprocess_kernel[(triton.cdiv(total_q, pre_m), heads)](
            out, d_out, delta, out.stride(0), out.stride(1), d_out.stride(0), d_out.stride(1),
            total_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m,
        )  # fmt: skip

    n_prog = _num_programs(total_k, num_seqs, max_k, blocks.bwd_kv)
    if n_prog > 0:
        # Causal key tiles are heaviest first-to-last (early keys are seen by more queries).
        sched = _schedule(cu_k, cu_q, blocks.bwd_kv, n_prog, heavy_last=False)
        K.bwd_dkdv_kernel[(n_prog, heads)](
            q, k, v, d_out, lse, delta, dk, dv, cu_q, cu_k, sched, *rel_ptrs,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            d_out.stride(0), d_out.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *rel_strides,
            total_q, n_prog, scale * _LOG2E, scale, rel_r,
            BLOCK_M=blocks.bwd_q_step, BLOCK_N=blocks.bwd_kv,
            BLOCK_W=_block_w(blocks.bwd_q_step, blocks.bwd_kv), **common,
        )  # fmt: skip

    n_prog = _num_programs(total_q, num_seqs, max_q, blocks.bwd_q)
    if n_prog > 0:
        sched = _schedule(cu_q, cu_k, blocks.bwd_q, n_prog, heavy_last=causal)
        K.bwd_dq_kernel[(n_prog, heads)](
            q, k, v, d_out, lse, delta, dq, cu_q, cu_k, sched, *rel_ptrs, *d_rel_ptrs,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            d_out.stride(0), d_out.stride(1), dq.stride(0), dq.stride(1),
            *rel_strides, *d_rel_strides,
            total_q, n_prog, scale * _LOG2E, scale, rel_r,
            BLOCK_M=blocks.bwd_q, BLOCK_N=blocks.bwd_kv_step,
            BLOCK_W=_block_w(blocks.bwd_q, blocks.bwd_kv_step), **common,
        )  # fmt: skip
    return result()


# ---------------------------------------------------------------------------------------------
# Registered ops and autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("speedasr::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    query_pos: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward op: ``(out (total_q, H, D) in q.dtype, lse (H, total_q) fp32 natural log)``."""
    return _launch_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
        query_pos, table,
    )  # fmt: skip


@flash_attn_varlen_fwd.register_fake
def _(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
    query_pos=None, table=None,
):  # fmt: skip
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, False)
    _check_rel_pos(q, query_pos, table, None)
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("speedasr::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    softmax_scale: float,
    query_pos: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward op: ``(dq, dk, dv, d_query_pos, d_table)``; the last two are empty tensors
    without rel_pos. Deterministic except ``d_table`` (fp32 atomics)."""
    return _launch_bwd(
        d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal, softmax_scale, query_pos, table,
    )  # fmt: skip


@flash_attn_varlen_bwd.register_fake
def _(
    d_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, scale,
    query_pos=None, table=None,
):  # fmt: skip
    if table is None:
        d_query_pos, d_table = q.new_empty(0), q.new_empty(0)
    else:
        d_query_pos, d_table = q.new_empty(q.shape), table.new_empty(table.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_query_pos, d_table


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, *rel = inputs
    query_pos, table = (*rel, None, None)[:2]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, query_pos, table)
    ctx.static_args = (max_q, max_k, causal, scale)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)  # the log-sum-exp is a by-product saved for the backward


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse, cu_q, cu_k, query_pos, table = ctx.saved_tensors
    if d_out.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        d_out = d_out.contiguous()
    dq, dk, dv, d_query_pos, d_table = flash_attn_varlen_bwd(
        d_out, q, k, v, out, lse, cu_q, cu_k, *ctx.static_args, query_pos, table
    )
    grads = (dq, dk, dv, None, None, None, None, None, None)
    if table is not None:
        grads += (d_query_pos, d_table)
    return (*grads, None, None)[: ctx.num_inputs]


flash_attn_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attn_varlen(
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
    """Attention over packed sequences with the Triton kernels; returns ``(total_q, H, D)``.

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, H, D)``; fp16, bf16 or fp32, CUDA.
        cu_seqlens_q, cu_seqlens_k: ``(B+1,)`` int32 offsets on the same device, from 0 to total.
        max_seqlen_q, max_seqlen_k: longest query/key sequence (host ints; upper bounds are fine).
        causal: bottom-right aligned causal mask.
        softmax_scale: defaults to ``1/sqrt(D)``.
        rel_pos: ``(query_pos (total_q, H, D), table (2R - 1, H, D))`` in q's dtype, ``R`` at
            least the longest sequence: adds the relative-position term (module docstring).
            Both get gradients.

    Raises:
        ValueError: on a bad shape, dtype, device, stride or offsets, before any kernel runs.
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, False)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bool(causal), scale)
    if rel_pos is None:
        out, _ = flash_attn_varlen_fwd(*args)
        return out
    query_pos, table = rel_pos
    _check_rel_pos(q, query_pos, table, None)
    out, _ = flash_attn_varlen_fwd(*args, query_pos, table)
    return out
