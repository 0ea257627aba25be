"""recipes/canary_finetune/run.sh end to end on the NeMo fixture and a small embedded corpus:
import -> eval -> fine-tune (packed, NeMo front end, aggregate tokenizer) -> eval -> export, and
the exported ``.nemo`` imports again to the run's last weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedasr.nemo.import_nemo import import_nemo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NEMO = ROOT / "tests" / "fixtures" / "nemo" / "canary_tiny.nemo"


def test_recipe_imports_finetunes_and_exports(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DATA": str(tmp_path / "data"), "HOURS": "0.005", "EXP": str(tmp_path / "exp"),
        "EVAL_MAX": "2",
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "recipes/canary_finetune/run.sh"), str(NEMO),
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.accelerator=cpu",
         "--trainer.devices=1", "--trainer.precision=32-true", "--data.num_workers=0",
         "--data.val_max_utterances=2", "--sampler.max_duration=20", "--optim.warmup_steps=1",
         "--trainer.enable_progress_bar=false"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    exp = tmp_path / "exp"
    for name in ("test_wer_before.json", "test_wer_after.json", "finetuned.nemo"):
        assert (exp / name).is_file(), name
    last = torch.load(exp / "train/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    again = torch.load(import_nemo(exp / "finetuned.nemo", tmp_path / "again").checkpoint,
                       weights_only=True)  # fmt: skip
    for key, tensor in last["state_dict"].items():
        assert torch.equal(again["state_dict"][key], tensor), key
