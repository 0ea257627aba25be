"""FrameBatchNorm: torch's BatchNorm1d over the real frames of a packed or padded batch."""

import pytest
import torch
from torch import nn

from speedasr.core.segments import Segments
from speedasr.nn.batchnorm import FrameBatchNorm
from speedasr.nn.layout import PackedLayout, PaddedLayout

C = 6
LENGTHS = [1, 7, 0, 13, 2]


def randomized(momentum=0.1, frozen=False):
    torch.manual_seed(0)
    bn = FrameBatchNorm(C, momentum=momentum, frozen=frozen)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    torch_bn = nn.BatchNorm1d(C, momentum=momentum)
    torch_bn.load_state_dict(bn.state_dict())
    return bn, torch_bn


def frames(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(lengths), C, generator=g) * 3 + 1).requires_grad_()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_training_equals_torch_batchnorm_on_the_real_frames(layout, momentum):
    bn, torch_bn = randomized(momentum)
    bn.train(), torch_bn.train()
    seg = Segments.from_lengths(LENGTHS)
    for step in range(3):  # running statistics over several updates
        x = frames(LENGTHS, seed=step)
        if layout == "packed":
            y = bn(x, PackedLayout(seg))
        else:  # junk in the padding must not enter the statistics
            y = seg.unpad(bn(seg.pad(x, value=1e3), PaddedLayout(seg)))
        want = torch_bn(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        w = torch.randn_like(y)
        got = torch.autograd.grad((y * w).sum(), (x, bn.weight, bn.bias))
        ref = torch.autograd.grad((want * w).sum(), (x, torch_bn.weight, torch_bn.bias))
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(torch_bn, name))


def test_eval_packed_equals_padded_equals_alone():
    bn, torch_bn = randomized()
    bn.eval(), torch_bn.eval()
    seg = Segments.from_lengths(LENGTHS)
    x = frames(LENGTHS, seed=5)
    packed = bn(x, PackedLayout(seg))
    padded = bn(seg.pad(x, value=-4.0), PaddedLayout(seg))
    torch.testing.assert_close(seg.unpad(padded), packed, rtol=0, atol=0)
    torch.testing.assert_close(packed, torch_bn(x), rtol=1e-6, atol=1e-6)
    for xi, yi in zip(seg.split(x), seg.split(packed), strict=True):
        alone = bn(xi, PackedLayout(Segments.from_lengths([xi.shape[0]])))
        assert torch.equal(alone, yi)


def test_frozen_statistics_in_training_mode():
    bn, torch_bn = randomized(frozen=True)
    bn.train(), torch_bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    seg = Segments.from_lengths(LENGTHS)
    x = frames(LENGTHS, seed=1)
    y = bn(x, PackedLayout(seg))
    torch.testing.assert_close(y, torch_bn(x), rtol=1e-6, atol=1e-6)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    y.sum().backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None  # the affine part still trains


def test_training_statistics_couple_the_utterances_of_a_batch():
    # the documented exception to "no utterance affects another"
    bn, _ = randomized()
    bn.train()
    seg = Segments.from_lengths([5, 9])
    x = frames([5, 9], seed=2)
    y = bn(x, PackedLayout(seg))
    x2 = x.detach().clone()
    x2[5:] += 10.0  # change only utterance 1
    y2 = bn(x2, PackedLayout(seg))
    assert not torch.allclose(y[:5], y2[:5])


def test_one_real_frame_in_training_is_a_clear_error_and_none_is_a_no_op():
    bn, _ = randomized()
    bn.train()
    with pytest.raises(ValueError, match="more than one real encoder frame"):
        bn(torch.randn(1, C), PackedLayout(Segments.from_lengths([1])))
    seg = Segments.from_lengths([0, 0])
    before = bn.running_mean.clone()
    y = bn(torch.randn(2, 3, C), PaddedLayout(seg, 3))
    assert y.shape == (2, 3, C) and torch.isfinite(y).all()
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0
