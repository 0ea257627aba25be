"""Transformer-XL relative positions: the attention term and the encoder layer, packed and
padded, against float64 references written from the formula (docs/canary.md §4.5), one utterance
at a time."""

import math

import pytest
import torch

from speedasr.core.segments import Segments
from speedasr.nn import attention as attention_module
from speedasr.nn import attention_torch
from speedasr.nn.attention import RelativePositions, packed_attention
from speedasr.nn.attention_torch import torch_packed_attention, torch_padded_attention
from speedasr.nn.layout import PackedLayout, PaddedLayout
from speedasr.nn.relpos import RelPositionSelfAttention, relative_sinusoids


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def reference(q, k, v, qp, table, lengths, dtype=torch.float64):
    """Per utterance, in ``dtype``: score[h,i,j] = (q_i·k_j + qp_i·table[R-1-(i-j)]) / √D."""
    r = (table.shape[0] + 1) // 2
    table = table.to(dtype)
    out, start = [], 0
    for n in lengths:
        qi, ki, vi, qpi = (t[start : start + n].to(dtype) for t in (q, k, v, qp))
        content = torch.einsum("ihd,jhd->hij", qi, ki)
        # row of the table for every (query i, key j): distance i - j
        rows = torch.tensor(
            [[r - 1 - (i - j) for j in range(n)] for i in range(n)], dtype=torch.long
        )
        position = torch.einsum(
            "ihd,ijhd->hij", qpi, table[rows.reshape(-1)].view(n, n, *table.shape[1:])
        )
        p = torch.softmax((content + position) / math.sqrt(q.shape[-1]), dim=-1)
        out.append(torch.einsum("hij,jhd->ihd", p, vi))
        start += n
    return torch.cat(out)


def make(lengths, heads=2, dim=8, extra=0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n, r = sum(lengths), max(max(lengths, default=1), 1) + extra
    q, k, v, qp = (torch.randn(n, heads, dim, generator=g, dtype=dtype) for _ in range(4))
    table = torch.randn(2 * r - 1, heads, dim, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, qp, table)]


# irregular lengths: length 1, an empty segment, long next to short; `extra` > 0: a table longer
# than the longest segment (the packed layout's table is sized by the batch, not the segment)
CASES = [([5, 1, 17, 3], 0), ([1], 0), ([4, 0, 6], 2), ([113, 7, 64, 1, 33], 0), ([2, 9], 5)]


def errors(got, want):
    return (got.double() - want).abs().max().item()


@pytest.mark.parametrize("lengths,extra", CASES)
def test_packed_matches_float64_reference_forward_and_backward(lengths, extra):
    q, k, v, qp, table = make(lengths, extra=extra)
    m = max(lengths)
    out = torch_packed_attention(q, k, v, cu(lengths), cu(lengths), m, m, rel_pos=(qp, table))
    ref = reference(q, k, v, qp, table, lengths)
    # within 2x the error of the same formula evaluated plainly in fp32 (the kernels' criterion)
    ref32 = reference(q, k, v, qp, table, lengths, dtype=torch.float32)
    assert errors(out, ref) <= 2 * errors(ref32, ref) + 1e-7
    grad = torch.randn(out.shape)
    inputs = (q, k, v, qp, table)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad.double())
    plain = torch.autograd.grad(ref32, inputs, grad)
    for a, b, c in zip(got, want, plain, strict=True):
        assert torch.isfinite(a).all()
        assert errors(a, b.double()) <= 2 * errors(c, b.double()) + 1e-6


def test_gradcheck_float64():
    lengths = [3, 1, 4]
    q, k, v, qp, table = make(lengths, heads=2, dim=3, extra=1, dtype=torch.float64)

    def fn(q, k, v, qp, table):
        return torch_packed_attention(q, k, v, cu(lengths), cu(lengths), 4, 4, rel_pos=(qp, table))

    assert torch.autograd.gradcheck(fn, (q, k, v, qp, table))


def test_padded_matches_reference_and_ignores_padding():
    lengths = [5, 1, 12, 0, 3]
    q, k, v, qp, table = make(lengths)
    seg = Segments.from_lengths(lengths)
    # junk in the padding must not reach the real rows
    qd, kd, vd, qpd = (seg.pad(t, value=9.0) for t in (q, k, v, qp))
    out = torch_padded_attention(qd, kd, vd, lengths, lengths, rel_pos=(qpd, table))
    ref = reference(q, k, v, qp, table, lengths)
    torch.testing.assert_close(seg.unpad(out).double(), ref, rtol=1e-5, atol=1e-6)


def test_several_groups_read_their_own_table_rows(monkeypatch):
    # force one dense call per segment, so every group has its own padded length T_g < R
    lengths = [50, 3, 47, 1, 20, 21, 2, 9]
    monkeypatch.setattr(
        attention_torch, "plan_groups",
        lambda lq, lk: [[i] for i in range(len(lq)) if lq[i] > 0],
    )  # fmt: skip
    attention_torch._plan.cache_clear()
    try:
        q, k, v, qp, table = make(lengths, extra=3)
        out = torch_packed_attention(q, k, v, cu(lengths), cu(lengths), 50, 50, rel_pos=(qp, table))
    finally:
        attention_torch._plan.cache_clear()
    ref = reference(q, k, v, qp, table, lengths)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_entry_point_passes_rel_pos_on_and_refuses_flash_attn(monkeypatch):
    lengths = [4, 6]
    q, k, v, qp, table = make(lengths)
    rel = RelativePositions(qp, table)
    args = (q, k, v, cu(lengths), cu(lengths), 6, 6)
    # "auto" decides from all five tensors; the Triton kernel's own rel_pos path is tested in
    # tests/kernels/test_flash_varlen_relpos.py
    seen = []
    monkeypatch.setattr(attention_module, "_auto_backend", lambda *t: seen.append(t) or "torch")
    got = packed_attention(*args, backend="auto", rel_pos=rel)
    assert torch.equal(got, torch_packed_attention(*args, rel_pos=(qp, table)))
    assert len(seen) == 1 and seen[0][3] is qp and seen[0][4] is table
    assert "triton" in attention_module.REL_POS_BACKENDS
    with pytest.raises(ValueError, match="relative positions"):
        packed_attention(*args, backend="flash_attn", rel_pos=rel)


def test_table_too_short_is_an_error():
    q, k, v, qp, table = make([5, 3])
    with pytest.raises(ValueError, match="rel_pos table"):
        torch_packed_attention(q, k, v, cu([5, 3]), cu([5, 3]), 5, 5, rel_pos=(qp, table[2:-2]))


def test_relative_sinusoids_layout():
    # descending distances, interleaved sin/cos (NeMo's RelPositionalEncoding)
    table = relative_sinusoids(4, 6).double()
    assert table.shape == (7, 6)
    for m in range(7):
        p = 3 - m
        for c in range(3):
            w = 10000 ** (-2 * c / 6)
            assert abs(table[m, 2 * c] - math.sin(p * w)) < 1e-6
            assert abs(table[m, 2 * c + 1] - math.cos(p * w)) < 1e-6


def layer_reference(layer, x, lengths):
    """The rel_pos layer for one utterance at a time in float64, straight from the formula."""
    h, dk = layer.heads, layer.head_dim
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    out, start = [], 0
    for n in lengths:
        xi = x[start : start + n].double()
        q, k, v = (xi @ w["qkv.weight"].T + w["qkv.bias"]).view(n, 3, h, dk).unbind(1)
        ac = torch.einsum("ihd,jhd->hij", q + w["pos_bias_u"], k)
        bd = torch.zeros_like(ac)
        for i in range(n):
            for j in range(n):
                p = i - j
                e = torch.tensor(
                    [f(p * 10000 ** (-2 * c / (h * dk))) for c in range(h * dk // 2)
                     for f in (math.sin, math.cos)], dtype=torch.float64,
                )  # fmt: skip
                pos = (e @ w["linear_pos.weight"].T).view(h, dk)
                bd[:, i, j] = ((q[i] + w["pos_bias_v"]) * pos).sum(-1)
        a = torch.softmax((ac + bd) / math.sqrt(dk), dim=-1)
        o = torch.einsum("hij,jhd->ihd", a, v).reshape(n, h * dk)
        out.append(o @ w["proj.weight"].T + w["proj.bias"])
        start += n
    return torch.cat(out)


def test_layer_packed_equals_padded_alone_and_reference_with_gradients():
    torch.manual_seed(0)
    layer = RelPositionSelfAttention(16, 2)
    with torch.no_grad():  # NeMo initialises the biases to zero; random ones test their use
        layer.pos_bias_u.normal_()
        layer.pos_bias_v.normal_()
    lengths = [1, 9, 2, 23, 0, 5]
    seg = Segments.from_lengths(lengths)
    x = torch.randn(seg.total, 16, requires_grad=True)
    y = layer(x, PackedLayout(seg, "torch"))
    ref = layer_reference(layer, x, lengths)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    padded = layer(seg.pad(x, value=3.0), PaddedLayout(seg))
    torch.testing.assert_close(seg.unpad(padded), y, rtol=1e-5, atol=1e-6)
    for xi, yi in zip(seg.split(x), seg.split(y), strict=True):
        alone = layer(xi, PackedLayout(Segments.from_lengths([xi.shape[0]]), "torch"))
        torch.testing.assert_close(yi, alone, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(y)
    params = list(layer.parameters())
    g_packed = torch.autograd.grad((y * w).sum(), [x, *params])
    g_padded = torch.autograd.grad((seg.unpad(padded) * w).sum(), [x, *params])
    for a, b in zip(g_packed, g_padded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_random_lengths_packed_and_padded(seed):
    rng = torch.Generator().manual_seed(100 + seed)
    count = int(torch.randint(1, 7, (1,), generator=rng))
    lengths = torch.randint(0, 40, (count,), generator=rng).tolist()
    lengths[int(torch.randint(0, count, (1,), generator=rng))] = 1  # always a length-1 segment
    q, k, v, qp, table = make(lengths, heads=3, dim=4, extra=seed, seed=seed)
    m = max(lengths)
    ref = reference(q, k, v, qp, table, lengths)
    packed = torch_packed_attention(q, k, v, cu(lengths), cu(lengths), m, m, rel_pos=(qp, table))
    seg = Segments.from_lengths(lengths)
    qd, kd, vd, qpd = (seg.pad(t, value=-7.0) for t in (q, k, v, qp))
    padded = seg.unpad(torch_padded_attention(qd, kd, vd, lengths, lengths, rel_pos=(qpd, table)))
    for out in (packed, padded):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(out.square().sum(), (q, k, v, qp, table))
        want = torch.autograd.grad(ref.square().sum(), (q, k, v, qp, table), retain_graph=True)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_autocast_gives_the_attention_one_dtype(monkeypatch):
    # Under autocast the projections run in bf16 while pos_bias_u/v stay fp32 parameters; adding
    # them must not promote the queries back to fp32, or q, k, v and the position tensors reach
    # the attention in mixed dtypes (which the Triton kernels refuse, so "auto" falls back).
    seen = []
    real = PackedLayout.attend

    def spy(self, q, k, v, keys, causal, rel_pos=None):
        seen.append({t.dtype for t in (q, k, v, *rel_pos)})
        return real(self, q, k, v, keys, causal, rel_pos)

    monkeypatch.setattr(PackedLayout, "attend", spy)
    layer = RelPositionSelfAttention(16, 2)
    seg = Segments.from_lengths([3, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(seg.total, 16), PackedLayout(seg, "torch"))
    assert seen == [{torch.bfloat16}]
