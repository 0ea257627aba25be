"""AEDModel with NeMo Canary's encoder options (rel_pos, BatchNorm, xscaling): packed ≡ padded ≡
one utterance at a time where the options allow it (eval mode, frozen statistics), and the option
checks of ModelConfig."""

import pytest
import torch

from speedasr.core.batch import IGNORE_INDEX, PackedBatch
from speedasr.core.segments import Segments
from speedasr.models.aed import AEDModel, ModelConfig

CANARY = dict(encoder_positions="rel_pos", xscaling=True, conv_norm="batch", block_out_norm=True)
FRAMES = [57, 1, 9, 120, 30]
TEXTS = [[5, 6, 7], [8], [], [9, 10, 11, 12, 13, 14], [20] * 9]
PROMPT = [2, 3, 4, 5]


def model(**kw) -> AEDModel:
    """A small Canary-option model with every position bias and BN statistic randomized."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=40, n_mels=16, subsampling_channels=4, d_model=16, encoder_layers=2,
        encoder_heads=2, conv_kernel=5, decoder_layers=1, dropout=0.0, attention_backend="torch",
        **{**CANARY, **kw},
    )  # fmt: skip
    m = AEDModel(cfg)
    with torch.no_grad():
        for name, t in m.named_buffers():
            if name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
        for name, p in m.named_parameters():
            if "pos_bias" in name:
                p.normal_()
    return m


def batch(indices) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(sum(FRAMES), 16, generator=g).split(FRAMES)
    tokens, targets = [], []
    for i in indices:
        tokens += PROMPT + TEXTS[i]
        targets += [IGNORE_INDEX] * (len(PROMPT) - 1) + TEXTS[i] + [1]
    return PackedBatch(
        features=torch.cat([feats[i] for i in indices]),
        feature_segments=Segments.from_lengths([FRAMES[i] for i in indices]),
        tokens=torch.tensor(tokens),
        targets=torch.tensor(targets),
        token_segments=Segments.from_lengths([len(PROMPT) + len(TEXTS[i]) for i in indices]),
        prompt_lengths=tuple(len(PROMPT) for _ in indices),
    )


def summed_loss_and_grads(m, b):
    """Token-summed CE and CTC (so batches add up over utterances) and their parameter grads."""
    m.zero_grad()
    out = m(b)
    n_ctc = max(sum(b.token_segments.lengths) - sum(b.prompt_lengths), 1)
    total = out.ce_loss * out.num_target_tokens + out.ctc_loss * n_ctc
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def rel_close(a, b, tol=1e-5):
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["eval", "train-frozen"])
def test_packed_equals_padded_equals_alone(mode):
    m = model(conv_norm_frozen=mode == "train-frozen")
    m.train(mode != "eval")
    everything = list(range(len(FRAMES)))
    packed, g_packed = summed_loss_and_grads(m, batch(everything))
    padded, g_padded = summed_loss_and_grads(m, batch(everything).to_padded(pad_id=0))
    rel_close(padded, packed)
    alone = torch.zeros(())
    g_alone = {n: torch.zeros_like(g) for n, g in g_packed.items()}
    for i in everything:
        loss, g = summed_loss_and_grads(m, batch([i]))
        alone = alone + loss
        for n in g_alone:
            g_alone[n] += g[n]
    rel_close(alone, packed)
    flat = [torch.cat([g[n].flatten() for n in sorted(g_packed)]) for g in (g_packed, g_padded)]
    rel_close(*flat)
    rel_close(torch.cat([g_alone[n].flatten() for n in sorted(g_packed)]), flat[0])


def test_training_statistics_match_between_packed_and_padded():
    a, b = model().train(), model().train()
    everything = list(range(len(FRAMES)))
    packed, _ = summed_loss_and_grads(a, batch(everything))
    padded, _ = summed_loss_and_grads(b, batch(everything).to_padded(pad_id=0))
    rel_close(padded, packed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if "running" in name:
            rel_close(y, x)


def test_option_checks():
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(encoder_positions="rel_pos", attention_backend="flash_attn")
    ModelConfig(encoder_positions="rel_pos", attention_backend="triton")  # the kernels have it
    with pytest.raises(ValueError, match="conv_norm_frozen"):
        ModelConfig(conv_norm_frozen=True)
    with pytest.raises(ValueError, match="conv_norm"):
        ModelConfig(conv_norm="group")
    with pytest.raises(ValueError, match="encoder_positions"):
        ModelConfig(encoder_positions="abs_pos")
    ModelConfig(encoder_positions="rel_pos", d_model=36, encoder_heads=4, decoder_heads=2)  # dk 9
    defaults = ModelConfig()
    assert (defaults.encoder_positions, defaults.conv_norm, defaults.xscaling) == (
        "rotary", "layer", False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "options", [{}, {"encoder_positions": "rotary", "conv_norm": "layer"}], ids=["all", "xscaling"]
)
def test_export_wrapper_applies_the_options(options):
    # speedasr export's PaddedEncoder reuses the blocks through a lengths-tensor layout: it must
    # apply xscaling and the relative positions, and BatchNorm's running statistics
    from speedasr.export import PaddedEncoder

    m = model(**options).eval()
    b = batch(list(range(len(FRAMES))))
    with torch.no_grad():
        want, segments = m.encode(b.features, b.feature_segments)
        lengths = torch.tensor(b.feature_segments.lengths)
        got, got_lengths, _ = PaddedEncoder(m)(b.feature_segments.pad(b.features), lengths)
    assert tuple(got_lengths.tolist()) == segments.lengths
    rel_close(segments.unpad(got), want)
