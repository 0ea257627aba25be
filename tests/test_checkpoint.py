"""Checkpoints saved by older versions: settings added since then take the value the old model
was built with, for resuming training (``check_resume_checkpoint``) and for inference
(``load_model``)."""

from dataclasses import asdict, replace

import pytest
import torch

from speedasr.checkpoint import load_model
from speedasr.core.segments import Segments
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.testing import tiny_texts
from speedasr.train.run import check_resume_checkpoint

# Added to ModelConfig after checkpoints were in use; their default is the old behaviour (off).
NEW_SETTINGS = ("absolute_token_positions", "absolute_memory_positions")

TINY = ModelConfig(
    d_model=32, encoder_layers=1, encoder_heads=2, decoder_layers=1, subsampling_channels=8,
    dropout=0.0, attention_backend="torch", vocab_size=96,
)  # fmt: skip


def save_old_checkpoint(path, config: ModelConfig, model=None, tokenizer=None) -> None:
    """A checkpoint as an older speedasr wrote it: its model config lacks ``NEW_SETTINGS``."""
    saved = {k: v for k, v in asdict(config).items() if k not in NEW_SETTINGS}
    state = model.state_dict() if model is not None else {}
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "hyper_parameters": {"model": saved},
        "global_step": 7,
    }
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer.to_state()
    torch.save(ckpt, path)


def test_resume_accepts_a_checkpoint_saved_before_the_new_settings(tmp_path):
    path = tmp_path / "old.ckpt"
    save_old_checkpoint(path, TINY)
    check_resume_checkpoint(str(path), TINY, tokenizer=None)  # the same model: accepted
    # ...and a run that turns a new setting on is refused: the old model was built without it.
    with pytest.raises(UserError, match="model.absolute_token_positions: checkpoint False"):
        check_resume_checkpoint(str(path), replace(TINY, absolute_token_positions=True), None)


def test_an_old_checkpoint_loads_for_inference_as_the_model_it_was(tmp_path):
    tokenizer = Tokenizer.train(tiny_texts(40, seed=1), tmp_path / "tok", TINY.vocab_size)
    config = replace(TINY, pad_id=tokenizer.pad_id)
    torch.manual_seed(0)
    old = AEDModel(config).eval()
    save_old_checkpoint(tmp_path / "old.ckpt", config, old, tokenizer)
    loaded = load_model(tmp_path / "old.ckpt")
    assert loaded.config == config and loaded.step == 7
    x, segments = torch.randn(50, config.n_mels), Segments.from_lengths([20, 30])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode(x, segments)[0], old.encode(x, segments)[0])
