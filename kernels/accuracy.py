"""Accuracy of the varlen kernels against the fp32 reference: curated length mixes and the rule.

One copy shared by the kernel tests (``tests/kernels``, CPU under ``TRITON_INTERPRET=1``) and the
GPU check (``speedasr bench gpu``, on hardware in bf16 and fp16).

The rule (as in flash-attention's tests): for the output and each of the three gradients, the
kernel's max-abs error against ``attention_ref`` in fp32 must be at most twice the error of plain
PyTorch attention computed in the kernel's dtype from the same inputs
(``attention_ref(..., upcast=False)``), plus ``ABS_TOLERANCE`` so that near-zero baselines (fp32,
or empty outputs) do not demand bit-exact results.

Relative positions (``compare_rel_pos_with_reference``): the same rule for the output and all five
gradients (q, k, v, query_pos, table), against an fp64 reference, with plain PyTorch in the
kernel's dtype as the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import attention_ref

# (name, query lengths, key lengths): each exercises a boundary of the tiling or of the masks.
# Tiles are 32 and 64 rows/keys, so 31/33/63/64/65/127/129 straddle every tile edge. Zero lengths
# are empty query or key segments; different q and k lengths are cross-attention, whose query and
# key offsets then differ from the first sequence on.
LENGTH_MIXES: list[tuple[str, list[int], list[int]]] = [
    ("single", [100], [100]),
    ("len1_and_empty", [1, 0, 5, 3, 0], [1, 4, 0, 7, 0]),
    ("tile_edges", [1, 17, 63, 64, 65, 127, 129], [1, 17, 63, 64, 65, 127, 129]),
    ("q_longer", [33, 70, 9], [5, 31, 9]),
    ("k_longer", [5, 31, 2], [33, 70, 65]),
    ("cross_mixed", [1, 65, 17, 0], [129, 1, 64, 31]),
]

OUTPUTS = ("out", "dq", "dk", "dv")
ABS_TOLERANCE = 1e-4
"""Absolute slack added to twice the baseline error (max-abs, in units of the outputs)."""

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def offsets(lengths: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B+1,)`` int32 cumulative offsets of ``lengths``, starting at 0."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).to(
        device
    )


def packed_inputs(len_q, len_k, head_dim, dtype, seed=0, heads=2, device="cpu"):
    """Random ``q (Σlen_q, H, D)``, ``k, v (Σlen_k, H, D)``, their offsets and an output gradient.

    Drawn on the CPU from ``seed`` and then moved, so every device gets the same values.
    Returns ``(q, k, v, cu_seqlens_q, cu_seqlens_k, grad_out)``.
    """
    gen = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (sum(len_q), heads, head_dim), (sum(len_k), heads, head_dim)
    q, k, v, grad = (
        torch.randn(s, generator=gen).to(device=device, dtype=dtype)
        for s in (shape_q, shape_k, shape_k, shape_q)
    )
    return q, k, v, offsets(len_q, device), offsets(len_k, device), grad


def forward_backward(fn: Attention, q, k, v, grad):
    """Output and ``(dq, dk, dv)`` of ``fn`` on fresh leaves copied from ``q, k, v``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad.to(out.dtype))
    return out.detach(), (q.grad, k.grad, v.grad)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def kernel(cu_q, cu_k, len_q, len_k, causal) -> Attention:
    """The Triton kernel as a function of ``(q, k, v)`` (imports triton when first called)."""
    from .flash_varlen import flash_attn_varlen

    max_q, max_k = max(len_q, default=0), max(len_k, default=0)
    return lambda q, k, v: flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal)


def reference(cu_q, cu_k, causal, upcast=True) -> Attention:
    return lambda q, k, v: attention_ref(q, k, v, cu_q, cu_k, causal, upcast=upcast)


REL_POS_OUTPUTS = (*OUTPUTS, "dquery_pos", "dtable")


def rel_pos_inputs(len_q, len_k, head_dim, dtype, seed=0, heads=1, device="cpu", extra=3):
    """``packed_inputs`` plus ``query_pos`` like q and a ``(2R - 1, H, D)`` table, ``R`` the
    longest sequence + ``extra`` (tables are longer than needed when a batch's longest is shorter
    than the table, e.g. a model's fixed table).

    Returns ``(q, k, v, query_pos, table, cu_seqlens_q, cu_seqlens_k, grad_out)``.
    """
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, head_dim, dtype, seed, heads, device)
    gen = torch.Generator().manual_seed(seed + 10_000)
    r = max([*len_q, *len_k, 1]) + extra
    query_pos, table = (
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        for shape in (q.shape, (2 * r - 1, heads, head_dim))
    )
    return q, k, v, query_pos, table, cu_q, cu_k, grad


def gradients(fn: Callable[..., torch.Tensor], inputs, grad):
    """Output and the gradient of every input of ``fn`` (fresh leaves copied from ``inputs``)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), tuple(t.grad for t in leaves)


@dataclass(frozen=True)
class OutputError:
    """Max-abs errors of one output (``out``, ``dq``, ``dk`` or ``dv``) against fp32."""

    output: str
    kernel: float
    """Error of the kernel, in its dtype."""
    torch: float
    """Error of plain PyTorch attention in the same dtype (the baseline)."""
    finite: bool
    """The kernel's values are all finite (no NaN/inf)."""
    floor: float = ABS_TOLERANCE
    """Absolute slack added to twice the baseline."""

    @property
    def tolerance(self) -> float:
        return 2 * self.torch + self.floor

    @property
    def passed(self) -> bool:
        return self.finite and self.kernel <= self.tolerance


def compare_with_reference(
    len_q, len_k, head_dim, dtype, causal, seed=0, heads=1, device="cpu"
) -> list[OutputError]:
    """Kernel and same-dtype PyTorch errors against fp32, for the output and each gradient.

    Heads default to one: the interpreter's cost is per program, and more heads only add identical
    programs at another head offset.
    """
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, head_dim, dtype, seed, heads, device)
    got = forward_backward(kernel(cu_q, cu_k, len_q, len_k, causal), q, k, v, grad)
    base = forward_backward(reference(cu_q, cu_k, causal, upcast=False), q, k, v, grad)
    want = forward_backward(reference(cu_q, cu_k, causal), q.float(), k.float(), v.float(), grad)
    flat = [(out, *grads) for out, grads in (got, base, want)]
    return [
        OutputError(name, max_abs_error(g, w), max_abs_error(b, w), bool(torch.isfinite(g).all()))
        for name, g, b, w in zip(OUTPUTS, *flat, strict=True)
    ]


def compare_rel_pos_with_reference(
    len_q, len_k, head_dim, dtype, causal, seed=0, heads=1, device="cpu", floor=ABS_TOLERANCE
) -> list[OutputError]:
    """With relative positions: kernel and same-dtype PyTorch (``attention_ref(...,
    upcast=False)``) errors against ``attention_ref`` in fp64, for ``REL_POS_OUTPUTS``."""
    from .flash_varlen import flash_attn_varlen

    *inputs, cu_q, cu_k, grad = rel_pos_inputs(len_q, len_k, head_dim, dtype, seed, heads, device)
    max_q, max_k = max(len_q, default=0), max(len_k, default=0)

    def kernel_fn(q, k, v, qp, table):
        return flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, rel_pos=(qp, table))

    def plain_fn(q, k, v, qp, table):
        return attention_ref(q, k, v, cu_q, cu_k, causal, upcast=False, rel_pos=(qp, table))

    got = gradients(kernel_fn, inputs, grad)
    base = gradients(plain_fn, inputs, grad)
    want = gradients(plain_fn, [t.double() for t in inputs], grad)
    flat = [(out, *grads) for out, grads in (got, base, want)]
    return [
        OutputError(
            name, max_abs_error(g, w), max_abs_error(b, w), bool(torch.isfinite(g).all()), floor
        )  # fmt: skip
        for name, g, b, w in zip(REL_POS_OUTPUTS, *flat, strict=True)
    ]
