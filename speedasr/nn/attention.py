"""One attention entry point for packed (THD) sequences, with explicit backends.

``packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=...)``

Layout: ``q: (total_q, H, D)``, ``k, v: (total_k, H, D)``; sequence i owns rows
``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i+1]`` of k/v.
Causal masking is bottom-right aligned (FlashAttention semantics): query j of a sequence with
``Lq`` queries and ``Lk`` keys sees keys ``<= j + Lk - Lq``. A query that sees no key (an empty key
segment, or causal with ``Lq > Lk``) outputs zeros and gets zero gradients, never NaN.

Backends (``backend=``):
  - ``"torch"``: pure PyTorch, CPU and GPU, forward and backward (the reference semantics).
  - ``"triton"``: speedasr's Triton varlen flash-attention (``speedasr.kernels``), CUDA.
  - ``"flash_attn"``: ``flash_attn_varlen_func`` if the flash-attn package is installed, CUDA.
  - ``"auto"``: triton on CUDA when importable, else torch.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

AttentionBackend = Literal["auto", "torch", "triton", "flash_attn"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "flash_attn")


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: AttentionBackend = "auto",
) -> torch.Tensor:
    """Attention over packed sequences; returns ``(total_q, H, D)`` in q's dtype."""
    if backend == "auto":
        backend = _auto_backend(q)
    if backend == "torch":
        from speedasr.nn.attention_torch import torch_packed_attention

        return torch_packed_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale
        )
    if backend == "triton":
        from speedasr.kernels.flash_varlen import flash_attn_varlen

        return flash_attn_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale
        )
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            raise ValueError(
                "attention backend 'flash_attn' needs the flash-attn package"
            ) from None
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            softmax_scale=softmax_scale, causal=causal,
        )  # fmt: skip
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _auto_backend(q: torch.Tensor) -> str:
    # Decided per call from the tensor, never at import: CPU-only machines must import this freely.
    if q.is_cuda and _triton_available():
        from speedasr.kernels.flash_varlen import supports

        if supports(q):  # e.g. fp64 or head dim > 256 fall back to torch instead of raising
            return "triton"
    return "torch"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
