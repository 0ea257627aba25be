"""Triton varlen flash-attention vs the fp32 reference, under TRITON_INTERPRET=1 (see conftest).

Accuracy rule (as in flash-attention's tests): in fp16 the kernel's max-abs error against the fp32
reference must be at most twice that of plain PyTorch attention computed in fp16 from the same
inputs (plus a small absolute floor for near-zero errors); in fp32 it must be ~1e-5 absolute.
Sizes are small because the interpreter runs every program in numpy.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from speedasr.kernels import flash_varlen as fv  # noqa: E402
from speedasr.kernels.accuracy import (  # noqa: E402
    LENGTH_MIXES,
    OUTPUTS,
    compare_with_reference,
    forward_backward,
    kernel,
    max_abs_error,
    offsets,
    packed_inputs,
    reference,
)
from speedasr.kernels.flash_varlen import flash_attn_varlen, flash_attn_varlen_fwd  # noqa: E402
from speedasr.kernels.reference import attention_ref  # noqa: E402

HEADS = 2


def _check_against_reference(len_q, len_k, head_dim, dtype, causal, seed=0):
    if dtype != torch.float32:  # the 2x-of-plain-PyTorch rule, as the GPU check applies it
        for e in compare_with_reference(len_q, len_k, head_dim, dtype, causal, seed):
            assert e.passed, f"{e.output}: kernel {e.kernel:.2e} vs plain {dtype} {e.torch:.2e}"
        return
    # One head: the interpreter's cost is per program, and heads only add identical programs at
    # another head offset (multi-head addressing is covered by the tests below, with 2 heads).
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, head_dim, dtype, seed, heads=1)
    out, grads = forward_backward(kernel(cu_q, cu_k, len_q, len_k, causal), q, k, v, grad)
    out_ref, grads_ref = forward_backward(reference(cu_q, cu_k, causal), q, k, v, grad)
    assert out.dtype == dtype and out.shape == q.shape
    for what, got, want in zip(OUTPUTS, (out, *grads), (out_ref, *grads_ref), strict=True):
        assert torch.isfinite(got).all(), what
        scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
        assert max_abs_error(got, want) <= 1e-5 * scale, what


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "head_dim,dtype",
    [(64, torch.float32), (128, torch.float32), (64, torch.float16), (128, torch.float16)],
    ids=["d64-fp32", "d128-fp32", "d64-fp16", "d128-fp16"],
)
@pytest.mark.parametrize("name,len_q,len_k", LENGTH_MIXES, ids=[c[0] for c in LENGTH_MIXES])
def test_matches_reference(name, len_q, len_k, head_dim, dtype, causal):
    _check_against_reference(len_q, len_k, head_dim, dtype, causal)


def test_causal_diagonal_sweep():
    # The causal offset diag = Lk - Lq decides which key blocks are fully visible (run unmasked)
    # and which straddle the diagonal (masked). Offsets within +-2 of every multiple of the 32-
    # and 64-wide tiles put the diagonal on, just before and just after each block edge.
    diags = [-66, -65, -64, -34, -33, -32, -2, -1, 0, 1, 30, 31, 32, 33, 62, 63, 64, 65]
    len_q = [70] * len(diags)
    len_k = [70 + d for d in diags]
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, 64, torch.float32, seed=5, heads=1)
    out, grads = forward_backward(kernel(cu_q, cu_k, len_q, len_k, True), q, k, v, grad)
    out_ref, grads_ref = forward_backward(reference(cu_q, cu_k, True), q, k, v, grad)
    for got, want in zip((out, *grads), (out_ref, *grads_ref), strict=True):
        assert max_abs_error(got, want) <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(
    "head_dim,dtype", [(40, torch.float32), (8, torch.float32), (160, torch.float16)]
)
def test_odd_head_dims(head_dim, dtype):
    # Head dims that are not powers of two run in the next power-of-two tile with masked columns
    # (40 -> 64 columns; 8 -> the 16-column minimum of tl.dot; 160 -> 256, the wide-head config).
    for causal in (False, True):
        _check_against_reference([65, 3], [33, 130], head_dim, dtype, causal, seed=3)


def test_log_sum_exp_and_queries_without_keys():
    # Sequence 0: causal with Lq > Lk leaves its first 3 queries without keys; sequence 1 has no
    # keys at all; sequence 2 has no queries (its keys must get zero gradients).
    len_q, len_k = [5, 4, 0, 7], [2, 0, 6, 7]
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, 64, torch.float32, seed=1)
    out, lse = flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 7, 7, True, 0.125)
    _, lse_ref = attention_ref(q, k, v, cu_q, cu_k, True, 0.125, return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert torch.allclose(lse[finite], lse_ref[finite], atol=1e-5)

    out, (dq, dk, dv) = forward_backward(kernel(cu_q, cu_k, len_q, len_k, True), q, k, v, grad)
    no_key_rows = [0, 1, 2, 5, 6, 7, 8]  # seq 0 rows 0-2, all of seq 1
    assert torch.equal(out[no_key_rows], torch.zeros_like(out[no_key_rows]))
    assert torch.equal(dq[no_key_rows], torch.zeros_like(dq[no_key_rows]))
    no_query_keys = slice(2, 8)  # seq 2
    assert torch.equal(dk[no_query_keys], torch.zeros_like(dk[no_query_keys]))
    assert torch.equal(dv[no_query_keys], torch.zeros_like(dv[no_query_keys]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sequences_are_isolated(causal):
    len_q, len_k = [40, 70, 9], [66, 33, 9]
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, 64, torch.float16, seed=2)
    fn = kernel(cu_q, cu_k, len_q, len_k, causal)
    out, grads = forward_backward(fn, q, k, v, grad)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[40:110], k2[66:99], v2[66:99] = 7.0, -3.0, 5.0  # replace sequence 1 entirely
    out2, grads2 = forward_backward(fn, q2, k2, v2, grad)
    others_q = torch.cat([torch.arange(0, 40), torch.arange(110, 119)])
    others_k = torch.cat([torch.arange(0, 66), torch.arange(99, 108)])
    assert not torch.equal(out[40:110], out2[40:110])
    assert torch.equal(out[others_q], out2[others_q])
    assert torch.equal(grads[0][others_q], grads2[0][others_q])
    assert torch.equal(grads[1][others_k], grads2[1][others_k])
    assert torch.equal(grads[2][others_k], grads2[2][others_k])


def test_backward_is_deterministic():
    len_q, len_k = [70, 5], [129, 64]
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, 64, torch.float16, seed=4)
    fn = kernel(cu_q, cu_k, len_q, len_k, True)
    _, first = forward_backward(fn, q, k, v, grad)
    _, second = forward_backward(fn, q, k, v, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_strided_views_and_expanded_grad():
    # q, k, v as views of one fused qkv projection (token stride 3*H*D); out.sum() gives an
    # expanded (stride-0) output gradient.
    len_q = [17, 65]
    qkv = torch.randn(sum(len_q), 3, HEADS, 64)
    q, k, v = qkv.unbind(1)
    cu = offsets(len_q)
    fn = kernel(cu, cu, len_q, len_q, True)
    out, grads = forward_backward(fn, q, k, v, torch.ones(sum(len_q), HEADS, 64))
    q2, k2, v2 = (t.contiguous().requires_grad_() for t in (q, k, v))
    fn(q2, k2, v2).sum().backward()
    assert torch.allclose(out, reference(cu, cu, True)(q, k, v), atol=1e-5)
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad), strict=True):
        assert torch.equal(a, b)


def _good_call():
    q, k, v, cu_q, cu_k, _ = packed_inputs([3, 5], [4, 6], 64, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6)


def _with(**changes):
    call = _good_call()
    for key, value in changes.items():
        call[key] = value(call) if callable(value) else value
    return call


BAD_CALLS = [
    (
        "offsets not at 0",
        dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)),
        "start at 0",
    ),
    ("last offset", dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), "ends at 9"),
    ("decreasing", dict(cu_seqlens_k=torch.tensor([0, 11, 10], dtype=torch.int32)), "non-decr"),
    ("batch counts", dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), "2 sequences"),
    ("int64 offsets", dict(cu_seqlens_q=lambda c: c["cu_seqlens_q"].long()), "int32"),
    ("float64", dict(q=lambda c: c["q"].double()), "unsupported"),
    ("mixed dtypes", dict(k=lambda c: c["k"].half()), "dtypes differ"),
    ("head dim", dict(k=lambda c: c["k"][..., :32]), "head dims differ"),
    (
        "head dim too big",
        dict(q=torch.randn(8, 2, 512), k=torch.randn(10, 2, 512), v=torch.randn(10, 2, 512)),
        "not in",
    ),  # fmt: skip
    (
        "fp32 head dim",
        dict(q=torch.randn(8, 2, 160), k=torch.randn(10, 2, 160), v=torch.randn(10, 2, 160)),
        r"not in \[1, 128\]",
    ),
    ("heads", dict(v=lambda c: c["v"][:, :1]), "head counts"),
    ("k vs v tokens", dict(v=lambda c: c["v"][:9]), "tokens"),
    ("2-D q", dict(q=lambda c: c["q"][:, 0]), "must be"),
    ("stride", dict(q=lambda c: c["q"].transpose(1, 2).contiguous().transpose(1, 2)), "stride"),
    ("max_seqlen", dict(max_seqlen_k=5), "max_seqlen"),
    ("max_seqlen type", dict(max_seqlen_q=5.0), "host int"),
]


@pytest.mark.parametrize("changes,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_before_launch(monkeypatch, changes, match):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was scheduled for a bad call")

    monkeypatch.setattr(fv, "_tile_schedule", no_launch)
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen(**_with(**changes))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fv, "_INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA"):
        flash_attn_varlen(**_good_call())


def test_tile_schedule_covers_every_tile_once():
    cu = offsets([0, 130, 1, 64, 65])
    cu_other = offsets([5, 10, 300, 1, 64])
    n_prog = fv._num_programs(260, 5, 130, 64)
    seq, tile = fv._tile_schedule(cu, cu_other, 64, n_prog, heavy_last=True).tolist()
    real = [(s, t) for s, t in zip(seq, tile, strict=True) if s >= 0]
    assert sorted(real) == [(1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (4, 0), (4, 1)]
    assert seq[: len(real)] == [2, 4, 4, 1, 1, 1, 3]  # heaviest (most keys) first, spares last
    assert tile[:3] == [0, 1, 0]  # heavy_last: a sequence's last (causally longest) tile first
    assert all(s == -1 for s in seq[len(real) :])


def test_offsets_are_checked_and_scheduled_once_per_batch(monkeypatch):
    len_q = [17, 65]
    q, k, v, cu, _, grad = packed_inputs(len_q, len_q, 64, torch.float32)
    fn = kernel(cu, cu, len_q, len_q, False)
    built = []
    real_schedule = fv._tile_schedule
    monkeypatch.setattr(fv, "_tile_schedule", lambda *a, **kw: built.append(a) or real_schedule(*a))
    forward_backward(fn, q, k, v, grad)
    # Self-attention, non-causal, equal tiles: forward, dK/dV and dQ share one schedule.
    assert len(built) == 1
    # "The next layer": same offsets, nothing rebuilt or re-read.
    forward_backward(fn, q, k, v, grad)
    assert len(built) == 1
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("offsets re-read"))
    forward_backward(fn, q, k, v, grad)
    monkeypatch.undo()
    cu[1] = 90  # an in-place write bumps the version: checked again, and now rejected
    with pytest.raises(ValueError, match="non-decreasing"):
        fn(q, k, v)


def test_packed_attention_triton_backend():
    from speedasr.nn.attention import _auto_backend, packed_attention

    len_q, len_k = [3, 65], [64, 2]
    q, k, v, cu_q, cu_k, _ = packed_inputs(len_q, len_k, 64, torch.float32)
    out = packed_attention(q, k, v, cu_q, cu_k, 65, 64, causal=True, backend="triton")
    assert torch.allclose(out, attention_ref(q, k, v, cu_q, cu_k, True), atol=1e-5)
    assert _auto_backend(q) == "torch"  # CPU tensors never pick the Triton kernels
    assert fv.supports(q) and fv.supports(q.half())
    assert not fv.supports(q.double()) and not fv.supports(torch.zeros(2, 1, 512))
    assert fv.supports(torch.zeros(2, 1, 160).half()) and not fv.supports(torch.zeros(2, 1, 160))


def test_registered_op_traces_with_fake_tensors():
    # opcheck: schema, fake implementation vs real outputs, autograd registration, AOT tracing.
    q, k, v, cu_q, cu_k, _ = packed_inputs([3, 17], [5, 2], 64, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(flash_attn_varlen_fwd, (q, k, v, cu_q, cu_k, 17, 5, True, 0.125))


def test_torch_compile_traces_forward_and_backward():
    len_q, len_k = [3, 17], [5, 2]
    q, k, v, cu_q, cu_k, grad = packed_inputs(len_q, len_k, 64, torch.float32)
    fn = kernel(cu_q, cu_k, len_q, len_k, True)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, grads = forward_backward(compiled, q, k, v, grad)
    out_eager, grads_eager = forward_backward(fn, q, k, v, grad)
    assert torch.equal(out, out_eager)
    for a, b in zip(grads, grads_eager, strict=True):
        assert torch.equal(a, b)
