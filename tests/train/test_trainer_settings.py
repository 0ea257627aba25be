"""Bad ``trainer.*`` overrides, and a ``model.attention_backend`` that cannot run on the run's
device: refused before any data is read, with one line that names the key (no traceback), exit
code 2."""

import sys

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


def _train(tmp_path, *overrides: str) -> list[str]:
    """``speedasr train`` argv whose data and tokenizer do not exist: a run that gets as far
    as reading anything fails naming them."""
    return [
        "train", f"--out_dir={tmp_path / 'exp'}", "--data.train_cuts=cuts.jsonl.gz",
        "--data.tokenizer=tok", *overrides,
    ]  # fmt: skip


def _one_error_line(capfd) -> str:
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_triton_backend_without_triton_stops_before_anything_is_read(monkeypatch, tmp_path, capfd):
    monkeypatch.setitem(sys.modules, "triton", None)  # as tests/test_extras.py simulates it
    for name in ("speedasr.kernels.flash_varlen", "speedasr.kernels.flash_varlen_kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    rc = main(_train(tmp_path, "--model.attention_backend=triton", "--trainer.accelerator=cpu"))
    assert rc == 2
    assert _one_error_line(capfd) == (
        "speedasr train: error: model.attention_backend=triton needs triton, which the core "
        "install leaves out (use model.attention_backend=auto or torch without it): "
        "pip install 'speedasr[gpu]'"
    )
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "accelerator",
    [
        "cpu",
        pytest.param(
            "auto", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
        ),
    ],
)
def test_triton_backend_off_cuda_stops_before_anything_is_read(
    accelerator, monkeypatch, tmp_path, capfd
):
    from speedasr.kernels import flash_varlen

    # The tests run the kernels interpreted, which takes CPU tensors; a user's Triton does not.
    monkeypatch.setattr(flash_varlen, "_INTERPRET", False)
    rc = main(
        _train(tmp_path, "--model.attention_backend=triton", f"--trainer.accelerator={accelerator}")
    )
    assert rc == 2
    assert _one_error_line(capfd) == (
        "speedasr train: error: model.attention_backend=triton runs only on CUDA GPUs and this "
        f"run trains on cpu (trainer.accelerator={accelerator}): use model.attention_backend=auto "
        "or torch"
    )
    assert not (tmp_path / "exp").exists()


def test_flash_attn_backend_without_the_package_stops_before_anything_is_read(
    monkeypatch, tmp_path, capfd
):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    rc = main(_train(tmp_path, "--model.attention_backend=flash_attn"))
    assert rc == 2
    assert _one_error_line(capfd) == (
        "speedasr train: error: model.attention_backend=flash_attn needs the flash-attn package, "
        "which is not installed: pip install flash-attn (CUDA only), or use "
        "model.attention_backend=auto or torch"
    )


def test_backends_that_run_here_pass_the_check(monkeypatch):
    from speedasr.kernels import flash_varlen
    from speedasr.train.run import check_attention_backend_runs

    for backend in ("auto", "torch"):
        check_attention_backend_runs(backend, "cpu")
    monkeypatch.setattr(flash_varlen, "_INTERPRET", True)  # TRITON_INTERPRET=1: CPU tensors run
    check_attention_backend_runs("triton", "cpu")
