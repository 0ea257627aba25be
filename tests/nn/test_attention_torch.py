import math

import pytest
import torch

from speedasr.nn.attention import packed_attention
from speedasr.nn.attention_torch import (
    per_utterance_attention,
    plan_groups,
    torch_packed_attention,
    torch_padded_attention,
)


def reference(q, k, v, lq, lk, causal):
    """Float64 explicit-softmax attention per segment (bottom-right causal, empty rows -> 0)."""
    out, oq, ok = [], 0, 0
    for nq, nk in zip(lq, lk, strict=True):
        qi, ki, vi = (t.double() for t in (q[oq : oq + nq], k[ok : ok + nk], v[ok : ok + nk]))
        s = torch.einsum("qhd,khd->hqk", qi, ki) / math.sqrt(q.shape[-1])
        allowed = torch.ones(nq, nk, dtype=torch.bool)
        if causal:
            allowed = torch.arange(nk)[None] <= torch.arange(nq)[:, None] + nk - nq
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without keys: all -inf -> NaN -> 0
        out.append(torch.einsum("hqk,khd->qhd", p, vi))
        oq, ok = oq + nq, ok + nk
    return torch.cat(out).float()


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make(lq, lk, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), heads, dim, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), heads, dim, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), heads, dim, generator=g, requires_grad=True)
    return q, k, v


CASES = [
    # (query lengths, key lengths): self-attention shapes, then cross-attention shapes.
    ([5, 1, 17, 3], [5, 1, 17, 3]),
    ([1], [1]),
    ([4, 0, 6], [4, 0, 6]),  # empty segment
    ([3, 1, 7, 2], [9, 4, 2, 0]),  # cross: Lq != Lk, an empty key segment, Lq > Lk
    ([113, 7, 64, 1, 33], [29, 2, 16, 1, 9]),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", CASES)
def test_matches_reference_forward_and_backward(lq, lk, causal):
    q, k, v = make(lq, lk)
    out = torch_packed_attention(q, k, v, cu(lq), cu(lk), max(lq), max(lk), causal)
    ref = reference(q, k, v, lq, lk, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(reference(q, k, v, lq, lk, causal), (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rows_without_keys_are_zero_with_zero_gradients():
    lq, lk = [3, 2, 4], [2, 0, 4]  # segment 0: causal with Lq > Lk; segment 1: no keys at all
    q, k, v = make(lq, lk)
    out = torch_packed_attention(q, k, v, cu(lq), cu(lk), 4, 4, causal=True)
    assert torch.isfinite(out).all()
    # bottom-right: query 0 of segment 0 sees key <= 0 + 2 - 3 = -1 -> nothing
    assert out[0].abs().max() == 0 and out[3:5].abs().max() == 0
    out.sum().backward()
    assert q.grad[0].abs().max() == 0 and q.grad[3:5].abs().max() == 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_all_keys_empty():
    q, k, v = make([3, 2], [0, 0])
    out = torch_packed_attention(q, k, v, cu([3, 2]), cu([0, 0]), 3, 0)
    assert out.shape == q.shape and out.abs().max() == 0
    out.sum().backward()
    assert q.grad.abs().max() == 0


def test_grouping_does_not_change_results():
    lq = [50, 3, 47, 1, 20, 21, 2, 0, 9]
    q, k, v = make(lq, lq)
    one = torch_packed_attention(q, k, v, cu(lq), cu(lq), 50, 50, causal=True)
    loop = per_utterance_attention(q, k, v, cu(lq), cu(lq), causal=True)
    torch.testing.assert_close(one, loop, rtol=1e-5, atol=1e-6)
    groups = plan_groups(lq, lq, slack=0.0, min_area=0)
    assert len(groups) > 3
    assert sorted(i for g in groups for i in g) == [i for i, n in enumerate(lq) if n > 0]


def test_plan_groups_bounds_padding():
    lengths = [400, 390, 380, 200, 190, 10, 9, 8, 1]
    for group in plan_groups(lengths, lengths, slack=0.25, min_area=0):
        real = sum(lengths[i] ** 2 for i in group)
        padded = len(group) * max(lengths[i] for i in group) ** 2
        assert padded <= 1.25 * real


def test_padded_matches_packed():
    lq, lk = [3, 1, 7], [9, 4, 2]
    q, k, v = make(lq, lk)
    out = torch_packed_attention(q, k, v, cu(lq), cu(lk), 7, 9, causal=True)

    def pad(x, lengths):
        rows = torch.split(x, lengths)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    padded = torch_padded_attention(pad(q, lq), pad(k, lk), pad(v, lk), lq, lk, causal=True)
    got = torch.cat([padded[i, :n] for i, n in enumerate(lq)])
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)


def test_perturbing_one_segment_leaves_others_bit_identical():
    lq, lk = [30, 5, 22, 1], [40, 8, 3, 12]
    q, k, v = make(lq, lk)
    out = torch_packed_attention(q, k, v, cu(lq), cu(lk), 30, 40, causal=False)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    q2[30:35] += 1.0  # segment 1's queries, keys and values
    k2[40:48] -= 2.0
    v2[40:48] *= 3.0
    q2, k2, v2 = (t.requires_grad_() for t in (q2, k2, v2))
    out2 = torch_packed_attention(q2, k2, v2, cu(lq), cu(lk), 30, 40, causal=False)
    grads2 = torch.autograd.grad(out2.square().sum(), (q2, k2, v2))
    others_q = torch.cat([torch.arange(0, 30), torch.arange(35, 58)])
    others_k = torch.cat([torch.arange(0, 40), torch.arange(48, 63)])
    assert torch.equal(out[others_q], out2[others_q])
    assert torch.equal(grads[0][others_q], grads2[0][others_q])
    assert torch.equal(grads[1][others_k], grads2[1][others_k])
    assert torch.equal(grads[2][others_k], grads2[2][others_k])
    assert not torch.equal(out[30:35], out2[30:35])


def test_entry_point_dispatches_to_torch():
    lq = [4, 6]
    q, k, v = make(lq, lq)
    a = packed_attention(q, k, v, cu(lq), cu(lq), 6, 6, causal=True, backend="torch")
    b = torch_packed_attention(q, k, v, cu(lq), cu(lq), 6, 6, causal=True)
    assert torch.equal(a, b)


def test_half_precision_runs():
    lq = [5, 3]
    q, k, v = (t.detach().bfloat16() for t in make(lq, lq))
    out = torch_packed_attention(q, k, v, cu(lq), cu(lq), 5, 5, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, lq, lq, True), rtol=2e-2, atol=2e-2)


def test_bad_shapes_raise():
    q, k, v = make([3], [3])
    with pytest.raises(ValueError):
        torch_packed_attention(q, k, v, cu([2]), cu([3]), 2, 3)
    with pytest.raises(ValueError):
        torch_packed_attention(q, k, v, cu([3]), cu([1, 2]), 3, 2)


def test_plan_made_in_inference_mode_serves_training():
    lq = [7, 3, 11]
    q, k, v = make(lq, lq)
    with torch.inference_mode():
        torch_packed_attention(q, k, v, cu(lq), cu(lq), 11, 11, causal=True)
    out = torch_packed_attention(q, k, v, cu(lq), cu(lq), 11, 11, causal=True)
    out.sum().backward()  # would fail if the cached plan held inference tensors
    assert torch.isfinite(q.grad).all()
