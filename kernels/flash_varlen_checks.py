"""Input validation of the varlen flash-attention (``speedasr.kernels.flash_varlen``).

Every problem raises ``ValueError`` naming the input, before any kernel is launched. Offsets are
read on the host once per batch (cached per tensor version), so layers after the first pay nothing.
Imports torch only: no triton needed to check a call.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# One head is one tile of next_power_of_2(D) columns. Past 256 (128 for fp32's 4-byte elements)
# the q/k/v/accumulator tiles no longer fit registers and shared memory even at 32 x 32 tiles:
# ptxas reports kilobytes of spills and, for fp32 D=256, more shared memory than an A100 has.
MAX_HEAD_DIM = 256
MAX_HEAD_DIM_FP32 = 128


def _max_head_dim(dtype: torch.dtype) -> int:
    return MAX_HEAD_DIM_FP32 if dtype == torch.float32 else MAX_HEAD_DIM


# Offsets whose values were already checked, with the (version, total, max_seqlen) they were checked
# for. A batch's cu_seqlens are built once and reused by every attention layer, so the host sync
# that reading them costs is paid once per batch, not once per layer (and never for an unchanged
# tensor). Weak keys: the cache never keeps a batch alive.
_checked_offsets: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    check_values: bool = True,
    allow_cpu: bool = False,
) -> int | None:
    """Raise ``ValueError`` naming the problem; ``check_values=False`` skips reading offsets.

    ``allow_cpu``: accept non-CUDA tensors (the Triton interpreter runs the kernels on CPU).
    Returns the longest query or key sequence when the offsets were read, else ``None``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attn_varlen: {name} must be (total, H, D), got {shape}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attn_varlen: dtype {q.dtype} unsupported; use {SUPPORTED_DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attn_varlen: q, k, v dtypes differ: {q.dtype} {k.dtype} {v.dtype}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"flash_attn_varlen: k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if not q.shape[1] == k.shape[1] == v.shape[1]:
        raise ValueError(
            f"flash_attn_varlen: head counts differ: q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}"
        )
    head_dim = q.shape[2]
    if not head_dim == k.shape[2] == v.shape[2]:
        raise ValueError(
            f"flash_attn_varlen: head dims differ: q {head_dim}, k {k.shape[2]}, v {v.shape[2]}"
        )
    if not 1 <= head_dim <= _max_head_dim(q.dtype):
        raise ValueError(
            f"flash_attn_varlen: head dim {head_dim} not in [1, {_max_head_dim(q.dtype)}] "
            f"for {q.dtype}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(
                f"flash_attn_varlen: {name} needs unit stride on the head dim, got strides "
                f"{t.stride()}; pass {name}.contiguous()"
            )
    devices = {t.device for t in (q, k, v, cu_seqlens_q, cu_seqlens_k)}
    if len(devices) != 1:
        names = sorted(map(str, devices))
        raise ValueError(f"flash_attn_varlen: inputs are on different devices: {names}")
    if q.device.type != "cuda" and not allow_cpu:
        raise ValueError(
            f"flash_attn_varlen: Triton kernels need CUDA tensors, got {q.device}; use "
            "packed_attention(backend='torch') on CPU (or TRITON_INTERPRET=1 to debug the kernels)"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(
                f"flash_attn_varlen: {name} must be a 1-D int32 tensor of B+1 offsets, got "
                f"{cu.dtype} of shape {tuple(cu.shape)}"
            )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"flash_attn_varlen: cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but "
            f"cu_seqlens_k has {cu_seqlens_k.numel() - 1}"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)) or m < 0:
            raise ValueError(f"flash_attn_varlen: {name} must be a host int >= 0, got {m!r}")
    if not check_values:
        return None
    longest_q = _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
    longest_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    if longest_q is None or longest_k is None:
        return None
    return max(longest_q, longest_k)


def _check_rel_pos(
    q: torch.Tensor, query_pos: torch.Tensor | None, table: torch.Tensor | None, longest: int | None
) -> None:
    """Raise ``ValueError`` for bad relative-position inputs (``longest`` None: skip the length)."""
    if query_pos is None and table is None:
        return
    if query_pos is None or table is None:
        raise ValueError("flash_attn_varlen: rel_pos needs both query_pos and table")
    if query_pos.shape != q.shape:
        raise ValueError(
            f"flash_attn_varlen: rel_pos query_pos {tuple(query_pos.shape)} does not match q "
            f"{tuple(q.shape)}"
        )
    rows = table.shape[0] if table.dim() == 3 else 0
    if table.dim() != 3 or table.shape[1:] != q.shape[1:] or rows % 2 == 0:
        raise ValueError(
            f"flash_attn_varlen: rel_pos table must be (2R-1, H, D) with q's H, D; got "
            f"{tuple(table.shape)}"
        )
    for name, t in (("query_pos", query_pos), ("table", table)):
        if t.dtype != q.dtype:
            raise ValueError(f"flash_attn_varlen: rel_pos {name} is {t.dtype}, q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"flash_attn_varlen: rel_pos {name} is on {t.device}, q on {q.device}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(
                f"flash_attn_varlen: rel_pos {name} needs unit stride on the head dim, got strides "
                f"{t.stride()}; pass {name}.contiguous()"
            )
    if longest is not None and (rows + 1) // 2 < longest:
        raise ValueError(
            f"flash_attn_varlen: rel_pos table covers distances up to {(rows - 1) // 2}, but a "
            f"sequence has {longest} positions (needs R >= {longest})"
        )


def _version(t: torch.Tensor) -> int | None:
    """In-place writes bump a tensor's version; inference-mode tensors have none (no caching)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _capturing(t: torch.Tensor) -> bool:
    # Inside CUDA-graph capture the offsets cannot be read back to the host (and tensors made
    # there live in the graph's private pool), so nothing is checked or cached while capturing.
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_offsets(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> int | None:
    """Check the offsets' values; return the longest sequence (``None`` while capturing)."""
    version = _version(cu)
    if _capturing(cu):
        return None
    cached = _checked_offsets.get(cu) if version is not None else None
    if cached is not None and cached[:3] == (version, total, max_seqlen):
        return cached[3]
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"flash_attn_varlen: {name} must start at 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(
            f"flash_attn_varlen: {name} ends at {offsets[-1]}, but the tensor has {total} rows"
        )
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"flash_attn_varlen: {name} must be non-decreasing, got {offsets}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(
            f"flash_attn_varlen: a sequence in {name} has {longest} rows > max_seqlen {max_seqlen}"
        )
    if version is not None:
        _checked_offsets[cu] = (version, total, max_seqlen, longest)
    return longest
