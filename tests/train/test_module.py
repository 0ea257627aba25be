import math

import pytest
import torch

from speedasr.data.dataset import AsrDataset
from speedasr.data.tokenizer import Tokenizer
from speedasr.models.aed import ModelConfig
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.module import AsrModule, OptimConfig, lr_lambda


def tiny_model_config(tok: Tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, d_model=32, encoder_layers=1,
        encoder_heads=2, decoder_layers=1, subsampling_channels=8, dropout=0.0,
        attention_backend="torch",
    )  # fmt: skip


def test_training_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer.train(tiny_texts(200, seed=1), tmp_path / "tok", vocab_size=100)
    cuts = make_tiny_cuts(tmp_path / "cuts", n=4, seed=0, durations=(0.5, 1.0))
    config = tiny_model_config(tok)
    batch = AsrDataset(tok, n_mels=config.n_mels)[cuts]
    module = AsrModule.build(config, OptimConfig(lr=3e-3), tok)
    opt = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = module.model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("kind", ["cosine", "inverse_sqrt", "constant"])
def test_schedule_warmup_and_decay(kind):
    f = lr_lambda(OptimConfig(warmup_steps=10, schedule=kind, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if kind == "cosine":
        assert f(110) == pytest.approx(0.1) and f(60) == pytest.approx(0.55)
    elif kind == "inverse_sqrt":
        assert f(40) == pytest.approx(0.5)
    else:
        assert f(100) == 1.0


def test_flops_per_batch_counts_real_content(tmp_path):
    from speedasr.models.sizing import count_flops

    tok = Tokenizer.train(tiny_texts(200, seed=1), tmp_path / "tok", vocab_size=100)
    cfg = tiny_model_config(tok)
    batch = AsrDataset(tok, n_mels=cfg.n_mels)[make_tiny_cuts(tmp_path / "c", n=3, seed=1)]
    module = AsrModule.build(cfg, OptimConfig(), tok)
    expected = sum(
        count_flops(cfg, t, n).training
        for t, n in zip(batch.feature_segments.lengths, batch.token_segments.lengths, strict=False)
    )
    assert module.flops_per_batch(batch) == expected
    assert module.flops_per_batch(batch.to_padded(tok.pad_id)) == expected
