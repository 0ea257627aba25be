"""Bad ``trainer.*`` overrides: Lightning validates them before any data is read, and the CLI
prints one line that names the key (no traceback), exit code 2."""

import pytest
import torch

from speedasr.cli import main
from speedasr.config import TrainerConfig
from speedasr.errors import UserError

BAD_OVERRIDES = [
    ("max_steps", "-5", "non-negative"),
    pytest.param(
        "accelerator", "gpu", "gpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
    ),
    ("precision", "bf16-mixedd", "bf16-mixedd"),
    ("devices", "abc", "devices"),
]  # fmt: skip


@pytest.mark.parametrize("key, value, says", BAD_OVERRIDES)
def test_bad_trainer_override_is_one_line_naming_the_key(key, value, says, tmp_path, capfd):
    rc = main([
        "train", f"--out_dir={tmp_path / 'exp'}", "--data.train_cuts=cuts.jsonl.gz",
        "--data.tokenizer=tok", f"--trainer.{key}={value}",
    ])  # fmt: skip
    out, err = capfd.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"speedasr train: error: trainer.{key}=")
    assert says in lines[0]
    assert not (tmp_path / "exp").exists()  # stopped before anything was made


def test_a_combination_that_fails_only_together_names_every_key_involved(monkeypatch):
    import speedasr.train.builder as builder
    from speedasr.train.builder import check_trainer_settings

    def lightning_says(settings: dict) -> str | None:  # refuses only the pair, like fsdp + cpu
        pair = settings["strategy"] == "fsdp" and settings["accelerator"] == "cpu"
        return "fsdp needs a GPU" if pair else None

    monkeypatch.setattr(builder, "_trainer_error", lightning_says)
    with pytest.raises(UserError) as e:
        check_trainer_settings(TrainerConfig(strategy="fsdp", accelerator="cpu"))
    assert str(e.value) == ("trainer.accelerator='cpu', trainer.strategy='fsdp': fsdp needs a GPU")


def test_good_trainer_settings_pass():
    from speedasr.train.builder import check_trainer_settings

    check_trainer_settings(TrainerConfig(max_steps=3, accelerator="cpu", devices=1))
