"""``StackingSubsampling`` against a per-utterance reference written here (pad to a multiple of
the factor, reshape, matmul), packed against padded (junk in the padding) and alone, with
gradients."""

import pytest
import torch
import torch.nn.functional as F

from speedasr.core.geometry import SUBSAMPLING_FACTORS, encoder_length
from speedasr.core.segments import Segments
from speedasr.nn.conformer import ConformerEncoder, StackingSubsampling

N_MELS, D_MODEL = 6, 10
FACTORS = [4, 8, 16]


def stacking(factor: int) -> StackingSubsampling:
    torch.manual_seed(factor)
    return StackingSubsampling(N_MELS, D_MODEL, SUBSAMPLING_FACTORS[factor])


def lengths_for(factor: int) -> list[int]:
    """0, 1, factor - 1, factor, factor + 1 and a long one, each next to the others."""
    return [0, 1, factor - 1, factor, factor + 1, 0, 3 * factor + 5, 1]


def features(lengths: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), N_MELS, generator=g)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int):
    """One utterance ``x: (T, n_mels)`` -> ``(ceil(T / factor), d_model)``, by hand."""
    groups = -(-x.shape[0] // factor)
    padded = F.pad(x, (0, 0, 0, groups * factor - x.shape[0]))
    return padded.reshape(groups, factor * x.shape[1]) @ weight.t() + bias


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def junk_padded(seg: Segments, x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """``seg.pad(x)`` with large random values (no NaN) in the padding."""
    g = torch.Generator().manual_seed(seed)
    out = 1e3 * torch.randn(seg.batch_size, seg.max_seqlen, x.shape[1], generator=g)
    out[seg.segment_ids, seg.positions] = x
    return out


@pytest.mark.parametrize("factor", FACTORS)
def test_packed_equals_a_hand_written_reference(factor):
    sub = stacking(factor)
    lengths = lengths_for(factor)
    seg = Segments.from_lengths(lengths)
    x = features(lengths)
    y, out_seg = sub.forward_packed(x, seg)
    assert sub.out.in_features == factor * N_MELS
    assert out_seg.lengths == tuple(encoder_length(n, sub.stages) for n in lengths)
    assert out_seg.lengths == tuple(-(-n // factor) for n in lengths)
    for xi, yi in zip(seg.split(x), out_seg.split(y), strict=True):
        close(yi, reference(xi, sub.out.weight, sub.out.bias, factor))


@pytest.mark.parametrize("factor", FACTORS)
def test_packed_equals_padded_with_junk_and_alone_with_gradients(factor):
    sub = stacking(factor)
    lengths = lengths_for(factor)
    seg = Segments.from_lengths(lengths)
    x = features(lengths, seed=factor).requires_grad_()
    y, out_seg = sub.forward_packed(x, seg)
    padded_x = junk_padded(seg, x.detach()).requires_grad_()
    padded, pad_seg, groups = sub.forward_padded(padded_x, seg)
    assert groups == -(-max(lengths) // factor) and pad_seg.lengths == out_seg.lengths
    close(pad_seg.unpad(padded), y)
    for xi, yi in zip(seg.split(x), out_seg.split(y), strict=True):
        alone, _ = sub.forward_packed(xi, Segments.from_lengths([xi.shape[0]]))
        close(yi, alone)
        alone_padded, _, _ = sub.forward_padded(xi[None], Segments.from_lengths([xi.shape[0]]))
        close(yi, alone_padded[0])
    # gradients: features (the padding's is zero: it never reaches the output) and weights
    w = torch.randn_like(y)
    params = list(sub.parameters())
    g_packed = torch.autograd.grad((y * w).sum(), [x, *params])
    g_padded = torch.autograd.grad((pad_seg.unpad(padded) * w).sum(), [padded_x, *params])
    close(seg.unpad(g_padded[0]), g_packed[0])
    assert not g_padded[0][~seg.mask()].any()
    for a, b in zip(g_packed[1:], g_padded[1:], strict=True):
        close(a, b)


def test_nan_in_the_padding_stays_out():
    sub = stacking(8)
    lengths = [3, 9]
    seg = Segments.from_lengths(lengths)
    x = features(lengths)
    padded, pad_seg, _ = sub.forward_padded(seg.pad(x, value=float("nan")), seg)
    y, _ = sub.forward_packed(x, seg)
    close(pad_seg.unpad(padded), y)


def test_empty_batches():
    sub = stacking(8)
    seg = Segments.from_lengths([0, 0])
    y, out_seg = sub.forward_packed(torch.zeros(0, N_MELS), seg)
    assert y.shape == (0, D_MODEL) and out_seg.lengths == (0, 0)
    padded, pad_seg, groups = sub.forward_padded(torch.zeros(2, 0, N_MELS), seg)
    assert padded.shape == (2, 0, D_MODEL) and groups == 0 and pad_seg.lengths == (0, 0)


def test_encoder_builds_stacking_and_ignores_the_channels():
    enc = ConformerEncoder(
        n_mels=N_MELS, subsampling_channels=999, d_model=16, layers=1, heads=2, d_ff=32,
        kernel_size=5, dropout=0.0, attention_backend="torch", subsampling_factor=4,
        subsampling="stacking",
    )  # fmt: skip
    assert isinstance(enc.subsampling, StackingSubsampling) and enc.subsampling.factor == 4
    assert sum(p.numel() for p in enc.subsampling.parameters()) == 4 * N_MELS * 16 + 16
