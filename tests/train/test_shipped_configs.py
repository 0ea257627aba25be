"""Every shipped model preset and recipe YAML trains.

Each config is loaded by ``speedasr train``'s own parser (an unknown key fails), the run builds its
data module and model config from it (``build_data_and_model_config``), and the model takes a
forward and backward step on a batch from that data module: features extracted the way the run
extracts them, so the mel bins of the data and the ``n_mels`` of the model must agree.

Models up to ``REAL_SIZE_PARAMS`` run at their real size. The Canary presets would take tens of
seconds and several GiB here: their full-size shapes are checked on the meta device (no memory, no
compute), and a width-scaled copy (same features and options, narrow and shallow) takes the step.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml

from speedasr.cli import main
from speedasr.core.batch import PackedBatch
from speedasr.data.tokenizer import Tokenizer
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.models.sizing import PRESETS, count_parameters
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.run import build_data_and_model_config, parse_config

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))
REAL_SIZE_PARAMS = 50e6
"""Larger models: full-size shapes on the meta device, the step on a width-scaled copy."""
NUM_CUTS = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> list[str]:
    """``speedasr train`` flags pointing a config at a 3-cut corpus and a 100-token tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_cuts(root / "cuts", n=NUM_CUTS, seed=0, durations=(0.4, 1.0))
    Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=100)
    return [f"--data.train_cuts={root / 'cuts/cuts.jsonl.gz'}", f"--data.tokenizer={root / 'tok'}"]


def model_recipe(cfg: ModelConfig, path: Path) -> Path:
    """A YAML config whose ``model`` section holds every field of ``cfg``, as a recipe would."""
    path.write_text(yaml.safe_dump({"model": asdict(cfg)}))
    return path


def width_scaled(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` narrow and shallow (8-wide encoder heads, at most 2 + 1 layers, 16 subsampling
    channels); features, head counts, decoder/encoder width ratio and every option unchanged."""
    d_model = 8 * cfg.encoder_heads
    decoder_d_model = None
    if cfg.decoder_d_model is not None:
        decoder_d_model = cfg.decoder_d_model * d_model // cfg.d_model
    return replace(
        cfg, d_model=d_model, decoder_d_model=decoder_d_model, subsampling_channels=16,
        encoder_layers=min(cfg.encoder_layers, 2), decoder_layers=min(cfg.decoder_layers, 1),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains(name, tiny_data, tmp_path):
    config = model_recipe(PRESETS[name], tmp_path / f"{name}.yaml")
    check_trains(parse_config(["--config", str(config), *tiny_data]))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(RECIPES_DIR)))
def test_every_recipe_trains(recipe, tiny_data):
    check_trains(parse_config(["--config", str(recipe), *tiny_data]))


def test_recipes_are_found():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "wer30.yaml", "canary-180m-flash.yaml"}


def check_trains(cfg) -> None:
    """The run's data and model, one training step (see the module docstring)."""
    datamodule, model_cfg = build_data_and_model_config(cfg)
    datamodule.setup("fit")
    batch = datamodule.dataset(spec_augment=cfg.data.spec_augment)[datamodule.train_cuts]
    assert isinstance(batch, PackedBatch) and batch.batch_size == NUM_CUTS
    if count_parameters(model_cfg).total <= REAL_SIZE_PARAMS:
        forward_backward(model_cfg, batch)
    else:
        check_full_size_on_meta(model_cfg, batch, datamodule.tokenizer.pad_id)
        forward_backward(width_scaled(model_cfg), batch)


def forward_backward(model_cfg: ModelConfig, batch: PackedBatch) -> None:
    """A packed training step: finite loss over every encoder frame, gradients that reach the
    input layer."""
    torch.manual_seed(0)
    model = AEDModel(model_cfg).train()
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.num_encoder_frames == sum(
        map(model_cfg.encoder_length, batch.feature_segments.lengths)
    )
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.subsampling.out.weight.grad.abs().sum() > 0


def check_full_size_on_meta(model_cfg: ModelConfig, batch: PackedBatch, pad_id: int) -> None:
    """The full-size model on the meta device: encoder and decoder output shapes on these
    features, and a gradient of the right shape for every parameter. Padded layout and no loss:
    the packed path reads its offsets on the host, and the loss picks text positions by value,
    neither of which a meta tensor has."""
    # BatchNorm's training statistics pick the real frames of a padded batch by value (boolean
    # indexing), which meta tensors lack: frozen statistics, the same parameters and shapes (the
    # width-scaled step runs the real training path).
    frozen = model_cfg.conv_norm == "batch"
    with torch.device("meta"):
        model = AEDModel(replace(model_cfg, conv_norm_frozen=frozen))
    padded = batch.to_padded(pad_id).to("meta")
    enc, enc_segments = model.encode_padded(padded.features, padded.feature_segments)
    logits = model.decode_logits(padded.tokens, padded.token_segments, enc, enc_segments)
    frames = max(map(model_cfg.encoder_length, batch.feature_segments.lengths))
    assert enc.shape == (batch.batch_size, frames, model_cfg.d_model)
    tokens = batch.token_segments.max_seqlen
    assert logits.shape == (batch.batch_size, tokens, model_cfg.vocab_size)
    logits.sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "encoder.subsampling.out.weight" in grads
    assert all(grads[n].shape == p.shape for n, p in model.named_parameters() if n in grads)


def test_train_then_eval_a_128_mel_canary_model_from_the_command_line(tiny_data, tmp_path, capsys):
    """``speedasr train`` one step of canary-180m-flash (128 mel bins) at a small width, then
    ``speedasr eval`` and ``transcribe``: the checkpoint's model config decides the features."""
    config = model_recipe(width_scaled(PRESETS["canary-180m-flash"]), tmp_path / "canary.yaml")
    out_dir = tmp_path / "exp"
    code = main([
        "train", "--config", str(config), *tiny_data, f"--out_dir={out_dir}",
        "--data.num_workers=0", "--sampler.max_duration=12", "--sampler.num_buckets=1",
        "--sampler.num_token_buckets=1", "--trainer.max_steps=1", "--trainer.max_epochs=null",
        "--trainer.enable_progress_bar=false", "--monitors.gpu=false",
    ])  # fmt: skip
    assert code == 0
    assert "1 steps" in capsys.readouterr().out
    ckpt = str(out_dir / "checkpoints/last.ckpt")
    cuts = tiny_data[0].split("=", 1)[1]
    assert main(["eval", "--ckpt", ckpt, "--cuts", cuts, "--quiet"]) == 0
    assert f"on {NUM_CUTS} utterances" in capsys.readouterr().out
    assert main(["transcribe", "--ckpt", ckpt, "--cuts", cuts, "--quiet"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == NUM_CUTS
