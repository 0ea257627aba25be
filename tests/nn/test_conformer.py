import pytest
import torch
from torch import nn

from speedasr.core.geometry import SUBSAMPLING_RECEPTIVE_FIELD, encoder_length, receptive_field
from speedasr.core.segments import Segments
from speedasr.nn.conformer import ConformerEncoder, ConvModule, ConvSubsampling
from speedasr.nn.layout import PackedLayout, PaddedLayout

N_MELS = 20


def encoder(layers=2, block_out_norm=False, **options):
    torch.manual_seed(0)
    return ConformerEncoder(
        n_mels=N_MELS, subsampling_channels=4, d_model=16, layers=layers, heads=2, d_ff=32,
        kernel_size=5, dropout=0.0, attention_backend="torch", block_out_norm=block_out_norm,
        **options,
    ).eval()  # fmt: skip


CANARY = dict(positions="rel_pos", xscaling=True, conv_norm="batch")
"""NeMo Canary's encoder options."""


def canary_encoder(**options):
    """The Canary options with every position bias and BatchNorm statistic randomized (their
    init values, zeros and identity statistics, would hide a term that is never applied)."""
    enc = encoder(block_out_norm=True, **{**CANARY, **options})
    with torch.no_grad():
        for name, t in enc.named_buffers():
            if name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
        for name, p in enc.named_parameters():
            if "pos_bias" in name or name.endswith("conv.norm.weight"):
                p.normal_()
    return enc


def features(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), N_MELS, generator=g)


def close(a, b):
    scale = b.detach().abs().max().clamp_min(1.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(scale))


# Mixed lengths: several shorter than the subsampling receptive field (15 frames), odd and even.
LENGTHS = [1, 2, 3, 7, 8, 9, 14, 15, 16, 40, 63]


@pytest.mark.parametrize("stages", [2, 3, 4])  # 4x, 8x (the default), 16x
def test_subsampling_lengths_follow_the_shared_formula(stages):
    sub = ConvSubsampling(N_MELS, 4, 8, stages)
    for n in list(range(0, 33)) + [100, 101, 999]:
        seg = Segments.from_lengths([n, 5])
        _, out = sub.forward_packed(torch.randn(n + 5, N_MELS), seg)
        assert out.lengths == (encoder_length(n, stages), encoder_length(5, stages))
        assert out.lengths[0] == -(-n // 2**stages)  # ceil(n / factor)
    assert SUBSAMPLING_RECEPTIVE_FIELD == receptive_field(3) == 15
    assert receptive_field(2) == 7  # 1 + 2 * (1 + 2)


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_subsampling_packed_equals_alone_and_padded(factor):
    sub = encoder(subsampling_factor=factor).subsampling
    stages = sub.stages
    seg = Segments.from_lengths(LENGTHS)
    x = features(LENGTHS).requires_grad_()
    y, out_seg = sub.forward_packed(x, seg)
    # each utterance alone, through plain convolutions (the padded path with B = 1)
    for xi, yi in zip(seg.split(x), out_seg.split(y), strict=True):
        alone, _, _ = sub.forward_padded(xi[None], Segments.from_lengths([xi.shape[0]]))
        close(yi, alone[0])
    padded, pad_seg, t_out = sub.forward_padded(seg.pad(x), seg)
    assert t_out == encoder_length(max(LENGTHS), stages)
    close(pad_seg.unpad(padded), y)
    # gradients
    w = torch.randn_like(y)
    g_packed = torch.autograd.grad((y * w).sum(), x)[0]
    g_padded = torch.autograd.grad((pad_seg.unpad(padded) * w).sum(), x)[0]
    close(g_packed, g_padded)


def test_zero_length_utterance_gives_zero_frames():
    sub = encoder().subsampling
    seg = Segments.from_lengths([5, 0, 9])
    y, out_seg = sub.forward_packed(features([5, 0, 9]), seg)
    assert out_seg.lengths == (1, 0, 2) and y.shape[0] == 3


def test_depthwise_conv_never_reads_across_utterances():
    conv = nn.Conv1d(6, 6, 9, padding=4, groups=6)
    lengths = [1, 4, 13, 2]
    seg = Segments.from_lengths(lengths)
    x = torch.randn(sum(lengths), 6)
    out = PackedLayout(seg).depthwise_conv(x, conv)
    for xi, oi in zip(seg.split(x), seg.split(out), strict=True):
        close(oi, conv(xi.t()[None])[0].t())
    # padded: junk in the padding must not leak in (it is zeroed first)
    padded = seg.pad(x, value=7.0)
    out_p = PaddedLayout(seg).depthwise_conv(padded, conv)
    close(seg.unpad(out_p), out)


def test_conv_module_is_zero_safe_after_glu_and_bias():
    # GLU(bias) makes padded frames non-zero; the padded path must zero them before the conv.
    torch.manual_seed(0)
    module = ConvModule(8, 5)
    nn.init.constant_(module.pointwise_in.bias, 3.0)
    lengths = [2, 6]
    seg = Segments.from_lengths(lengths)
    x = torch.randn(8, 8)
    packed = module(x, PackedLayout(seg))
    padded = module(seg.pad(x), PaddedLayout(seg))
    close(seg.unpad(padded), packed)


@pytest.mark.parametrize("seed", range(3))
def test_subsampling_output_varies_over_time_at_init(seed):
    # The encoder must start from an input that differs from frame to frame. With torch's default
    # conv init the time-varying part of the output is ~12-19% of its RMS (the rest is a constant
    # from the biases) and CTC training stalls on its all-blank plateau; He init gives 59-75%.
    torch.manual_seed(seed)
    sub = ConvSubsampling(80, 32, 144)
    x = torch.randn(800, 80)
    y, _ = sub.forward_packed(x, Segments.from_lengths([800]))
    varying = y.std(0).pow(2).mean().sqrt()
    assert varying / y.pow(2).mean().sqrt() > 0.4


def test_encoder_uses_no_batch_statistics():
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder().modules())


@pytest.mark.parametrize("block_out_norm", [False, True])
def test_encoder_packed_equals_padded_and_alone_with_gradients(block_out_norm):
    enc = encoder(block_out_norm=block_out_norm)
    seg = Segments.from_lengths(LENGTHS)
    x = features(LENGTHS).requires_grad_()
    y, layout = enc.forward_packed(x, seg)
    assert layout.segments.lengths == tuple(encoder_length(n) for n in LENGTHS)
    assert_padded_and_alone_equal_packed(enc, seg, x, y, layout)


@pytest.mark.parametrize("canary", [False, True], ids=["default", "canary-eval"])
def test_perturbing_one_utterance_leaves_others_bit_identical(canary):
    enc = canary_encoder() if canary else encoder()
    lengths = [33, 9, 50, 2]
    seg = Segments.from_lengths(lengths)
    x = features(lengths).requires_grad_()
    y, layout = enc.forward_packed(x, seg)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().clone()
    x2[33:42] = torch.randn(9, N_MELS) * 5  # utterance 1
    x2.requires_grad_()
    y2, _ = enc.forward_packed(x2, seg)
    (gx2,) = torch.autograd.grad(y2.square().sum(), x2)
    out_rows = layout.segments.segment_ids != 1
    in_rows = seg.segment_ids != 1
    assert torch.equal(y[out_rows], y2[out_rows])
    assert torch.equal(gx[in_rows], gx2[in_rows])
    assert not torch.equal(y[~out_rows], y2[~out_rows])


@pytest.mark.parametrize("n", [1, 3, 8, 14])
def test_short_utterance_next_to_long_ones(n):
    # Rule: T < receptive field is computed exactly as if alone (zeros complete the receptive
    # field, never a neighbour's frames), giving ceil(T / 8) >= 1 encoder frames.
    enc = encoder()
    lengths = [40, n, 40]
    seg = Segments.from_lengths(lengths)
    x = features(lengths)
    y, layout = enc.forward_packed(x, seg)
    mid = layout.segments.split(y)[1]
    alone, _ = enc.forward_packed(seg.split(x)[1], Segments.from_lengths([n]))
    assert mid.shape[0] == encoder_length(n) >= 1
    close(mid, alone)


def test_subsampling_stream_isolates_every_length_combination():
    # The gapped stream must leave a zero frame on each side of every utterance at every stage and
    # start each one at an even offset: check all small lengths against neighbours of every parity.
    sub = encoder().subsampling
    for n in range(0, 26):
        lengths = [n, 17, n + 1, 8, n]
        seg = Segments.from_lengths(lengths)
        x = features(lengths, seed=n)
        y, out_seg = sub.forward_packed(x, seg)
        for xi, yi in zip(seg.split(x), out_seg.split(y), strict=True):
            alone, _, _ = sub.forward_padded(xi[None], Segments.from_lengths([xi.shape[0]]))
            assert yi.shape == alone[0].shape
            if yi.numel():
                close(yi, alone[0])


@pytest.mark.parametrize(
    "options",
    [CANARY, dict(positions="rel_pos"), dict(conv_norm="batch")],
    ids=["rel_pos+batch+xscaling", "rel_pos", "batch"],
)
def test_canary_options_packed_equals_padded_and_alone_in_eval(options):
    enc = canary_encoder(**options)
    seg = Segments.from_lengths(LENGTHS)
    x = features(LENGTHS).requires_grad_()
    y, layout = enc.forward_packed(x, seg)
    assert_padded_and_alone_equal_packed(enc, seg, x, y, layout, pad_value=5.0)


def test_frozen_batchnorm_keeps_utterances_apart_in_training():
    enc = canary_encoder(conv_norm_frozen=True).train()  # dropout is 0: only BN differs
    stats = {k: v.clone() for k, v in enc.state_dict().items() if "running" in k}
    seg = Segments.from_lengths(LENGTHS)
    x = features(LENGTHS)
    y, layout = enc.forward_packed(x, seg)
    y_pad, _ = enc.forward_padded(seg.pad(x), seg)
    close(layout.segments.unpad(y_pad), y)
    for xi, yi in zip(seg.split(x), layout.segments.split(y), strict=True):
        alone, _ = enc.forward_packed(xi, Segments.from_lengths([xi.shape[0]]))
        close(yi, alone)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in stats.items())


def test_training_batchnorm_packed_equals_padded_but_couples_utterances():
    # masked statistics: padded training = packed training, same running statistics after
    packed_enc, padded_enc = canary_encoder().train(), canary_encoder().train()
    seg = Segments.from_lengths(LENGTHS)
    x = features(LENGTHS)
    y, layout = packed_enc.forward_packed(x, seg)
    y_pad, _ = padded_enc.forward_padded(seg.pad(x, value=5.0), seg)
    close(layout.segments.unpad(y_pad), y)
    stats = padded_enc.state_dict()
    for k, a in packed_enc.state_dict().items():
        if "running" in k:
            close(a, stats[k])
    # ...but an utterance's output now depends on its batch (documented in speedasr.nn.batchnorm)
    first = seg.split(x)[-1]
    alone, _ = canary_encoder().train().forward_packed(first, Segments.from_lengths([len(first)]))
    assert not torch.allclose(layout.segments.split(y)[-1], alone, atol=1e-3)


def test_xscaling_multiplies_the_subsampling_output():
    seg = Segments.from_lengths([30, 9])
    x = features([30, 9])
    plain = encoder(layers=0, block_out_norm=True)
    scaled = encoder(layers=0, block_out_norm=True, xscaling=True)  # same seed: same weights
    y, _ = plain.forward_packed(x, seg)
    ys, _ = scaled.forward_packed(x, seg)
    close(ys, y * 4.0)  # sqrt(d_model = 16)


def assert_padded_and_alone_equal_packed(enc, seg, x, y, layout, pad_value=0.0):
    """The padded batch (padding filled with ``pad_value``) and each utterance alone give the
    packed output ``y``; padded and packed give the same gradients for ``x`` and every weight."""
    y_pad, _ = enc.forward_padded(seg.pad(x, value=pad_value), seg)
    close(layout.segments.unpad(y_pad), y)
    for xi, yi in zip(seg.split(x), layout.segments.split(y), strict=True):
        alone, _ = enc.forward_packed(xi, Segments.from_lengths([xi.shape[0]]))
        close(yi, alone)
    w = torch.randn_like(y)
    params = list(enc.parameters())
    g1 = torch.autograd.grad((y * w).sum(), [x, *params])
    g2 = torch.autograd.grad((layout.segments.unpad(y_pad) * w).sum(), [x, *params])
    for a, b in zip(g1, g2, strict=True):
        close(a, b)
