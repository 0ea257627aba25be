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

Relative positions (``rel_pos=RelativePositions(query, table)``, Transformer-XL as in NeMo's
``rel_pos`` encoders) add ``query[i] · table[R - 1 - (i - j)]`` (times the softmax scale) to every
score (semantics in ``speedasr.nn.attention_torch``). The pure-PyTorch and the Triton backends
compute that term, forward and backward (``REL_POS_BACKENDS``); ``"auto"`` picks Triton on CUDA as
without it (when q, k, v and both position tensors share a dtype the kernels support), else torch;
``"flash_attn"`` raises ``ValueError``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal, NamedTuple

import torch

from speedasr.errors import UserError
from speedasr.extras import EXTRAS, MissingExtraError

AttentionBackend = Literal["auto", "torch", "triton", "flash_attn"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "flash_attn")
REL_POS_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
"""Backends that compute the relative-position term (flash-attn's kernels have no such term)."""


class RelativePositions(NamedTuple):
    """The Transformer-XL position term of one attention call.

    ``query``: ``(total_q, H, D)`` (NeMo: ``q + pos_bias_v``); ``table``: ``(2R - 1, H, D)``, row
    ``m`` for the relative distance ``i - j = R - 1 - m`` (NeMo: ``linear_pos`` of the sinusoid
    table), ``R`` at least the longest sequence.
    """

    query: torch.Tensor
    table: torch.Tensor


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
    rel_pos: RelativePositions | None = None,
) -> torch.Tensor:
    """Attention over packed sequences; returns ``(total_q, H, D)`` in q's dtype."""
    if rel_pos is not None and backend not in REL_POS_BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} cannot add relative positions (rel_pos); use one of "
            f"{REL_POS_BACKENDS}"
        )
    if backend == "auto":
        backend = _auto_backend(q, k, v, *(rel_pos or ()))
    if backend == "torch":
        from speedasr.nn.attention_torch import torch_packed_attention

        return torch_packed_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
            rel_pos,
        )  # fmt: skip
    if backend == "triton":
        from speedasr.kernels.flash_varlen import flash_attn_varlen

        return flash_attn_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
            tuple(rel_pos) if rel_pos is not None else None,
        )  # fmt: skip
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


def _auto_backend(q: torch.Tensor, *others: torch.Tensor) -> str:
    """Triton for CUDA tensors it supports, else torch. ``others``: k, v and the position
    tensors, which must share q's dtype (under autocast they may not; the torch path copes)."""
    # Decided per call from the tensor, never at import: CPU-only machines must import this freely.
    if q.is_cuda and _triton_available():
        from speedasr.kernels.flash_varlen import supports

        if supports(q, *others):  # e.g. fp64 or head dim > 256 fall back to torch, not raise
            return "triton"
    return "torch"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_attention_backend(
    backend: str, cuda: bool, *, setting: str, device: str, instead: str
) -> None:
    """``UserError`` when the attention ``backend`` cannot run where the model will run (``cuda``:
    on a CUDA device), so that it is said before any data is read: the backend itself fails only
    at the first batch. The message is ``setting`` (what chose the backend), the problem (with
    ``device``, the device in words) and ``instead`` (the setting that would run here)."""
    if backend == "triton":
        try:
            flash_varlen = importlib.import_module("speedasr.kernels.flash_varlen")
        except MissingExtraError:
            distribution, extra = EXTRAS["triton"]
            raise UserError(
                f"{setting} needs {distribution}, which the core install leaves out (use "
                f"{instead} without it): pip install 'speedasr[{extra}]'"
            ) from None
        # Under TRITON_INTERPRET=1 (read when the kernels were decorated) they run on CPU
        # tensors too: slowly, for debugging them (and for the tests).
        if cuda or flash_varlen._INTERPRET:
            return
    elif backend == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise UserError(
                f"{setting} needs the flash-attn package, which is not installed: pip install "
                f"flash-attn (CUDA only), or use {instead}"
            ) from None
        if cuda:
            return
    else:  # auto picks a backend that runs here; torch runs everywhere
        return
    raise UserError(f"{setting} runs only on CUDA GPUs and {device}: use {instead}")
