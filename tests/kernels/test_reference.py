"""The fp32 reference itself, checked against PyTorch's SDPA one sequence at a time (fp64).

``torch.nn.attention.bias.causal_lower_right`` is PyTorch's own bottom-right causal mask, an
independent statement of the semantics the reference (and so the kernels) must follow.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention as sdpa

from speedasr.kernels.reference import attention_ref


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_per_sequence(causal):
    len_q, len_k = [4, 9, 1, 6], [4, 3, 7, 6]
    q, k, v = (torch.randn(sum(n), 3, 8, dtype=torch.float64) for n in (len_q, len_k, len_k))
    out, lse = attention_ref(q, k, v, _offsets(len_q), _offsets(len_k), causal, 0.3, False, True)
    oq = ok = 0
    for lq, lk in zip(len_q, len_k, strict=True):
        qi, ki, vi = (
            t.transpose(0, 1) for t in (q[oq : oq + lq], k[ok : ok + lk], v[ok : ok + lk])
        )
        mask = causal_lower_right(lq, lk) if causal else None
        want = sdpa(qi, ki, vi, attn_mask=mask, scale=0.3).transpose(0, 1)
        seen = (torch.arange(lq) + lk - lq >= 0) if causal else torch.ones(lq, dtype=torch.bool)
        got = out[oq : oq + lq]
        assert torch.allclose(got[seen], want[seen])
        assert torch.equal(got[~seen], torch.zeros_like(got[~seen]))  # rows that see no key
        scores = (qi @ ki.transpose(1, 2) * 0.3).float()
        if causal:
            scores = scores.masked_fill(~mask._materialize(), float("-inf"))
        want_lse = torch.logsumexp(scores, -1)
        assert torch.allclose(lse[:, oq : oq + lq][:, seen], want_lse[:, seen])
        assert torch.isinf(lse[:, oq : oq + lq][:, ~seen]).all()
        oq, ok = oq + lq, ok + lk


def test_empty_segments_and_masked_rows_give_zero_output_and_grads():
    len_q, len_k = [3, 0, 2, 4], [0, 5, 2, 1]
    q, k, v = (
        torch.randn(sum(n), 2, 8, requires_grad=True) for n in (len_q, len_k, len_k)
    )  # fmt: skip
    out = attention_ref(q, k, v, _offsets(len_q), _offsets(len_k), causal=True)
    out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    no_key_rows = [0, 1, 2, 5, 6, 7]  # seq 0 (no keys), seq 3 rows 0-2 (causal, Lq > Lk)
    assert torch.equal(out[no_key_rows], torch.zeros_like(out[no_key_rows]))
    assert torch.equal(q.grad[no_key_rows], torch.zeros_like(q.grad[no_key_rows]))
    assert torch.equal(k.grad[:5], torch.zeros_like(k.grad[:5]))  # seq 1 has no queries


def test_upcast_false_stays_in_input_dtype():
    q = torch.randn(5, 2, 16, dtype=torch.float16)
    cu = _offsets([2, 3])
    assert attention_ref(q, q, q, cu, cu, upcast=False).dtype == torch.float16
    assert attention_ref(q, q, q, cu, cu).dtype == torch.float32
