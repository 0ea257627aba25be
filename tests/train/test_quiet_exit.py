"""A CPU training run ends quietly: no leak reports from GPU libraries it never used.

Lightning imports ``torch._dynamo``, which imports triton when it is installed; triton's nanobind
bindings report, at interpreter exit, every object of theirs that is still alive. The data module
freezes the garbage collector's objects before forking workers (datamodule.py), and objects that
stay frozen outlive the final collection, so every run with workers printed ~30 lines of
``nanobind: leaked N instances``.
"""

import subprocess
import sys

import pytest

from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_tiny_cuts, tiny_texts

TINY_CONFIG = """\
seed: 0
model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,
        subsampling_channels: 8}
sampler: {mode: packed, max_duration: 7.0, num_buckets: 2, num_token_buckets: 1}
optim: {lr: 0.003, warmup_steps: 1}
trainer: {max_epochs: null, max_steps: 2, enable_progress_bar: false, log_every_n_steps: 1,
          accelerator: cpu, devices: 1}
monitors: {padding: false, gpu: false, throughput: false}
data: {num_workers: 1}
"""


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cpu_train_with_workers_ends_without_leak_reports(tmp_path):
    make_tiny_cuts(tmp_path / "train", n=6, seed=0)
    Tokenizer.train(tiny_texts(100, seed=1), tmp_path / "tok", vocab_size=64)
    (tmp_path / "c.yaml").write_text(TINY_CONFIG)
    proc = run_python(
        "-m", "speedasr.cli", "train", "--config", str(tmp_path / "c.yaml"),
        "--out_dir", str(tmp_path / "out"), "--data.tokenizer", str(tmp_path / "tok"),
        "--data.train_cuts", str(tmp_path / "train/cuts.jsonl.gz"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out/checkpoints/last.ckpt").is_file()  # it did train
    noise = [line for line in proc.stderr.splitlines() if "nanobind" in line or "leaked" in line]
    assert noise == []


FORWARD_ON_CPU = """\
import sys
import torch
from speedasr.core.batch import PackedBatch
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.core.segments import Segments

config = ModelConfig(vocab_size=40, d_model=16, encoder_layers=1, encoder_heads=2,
                     decoder_layers=1, subsampling_channels=4)
assert config.attention_backend == "auto"
model = AEDModel(config)
frames, tokens = [40, 17], [3, 5]
batch = PackedBatch(
    features=torch.randn(sum(frames), config.n_mels),
    feature_segments=Segments.from_lengths(frames),
    tokens=torch.randint(2, 40, (sum(tokens),)),
    targets=torch.randint(2, 40, (sum(tokens),)),
    token_segments=Segments.from_lengths(tokens),
    prompt_lengths=(1, 1),
)
model(batch).loss.backward()
print("triton" in sys.modules)
"""


def test_cpu_forward_with_default_backend_does_not_import_triton():
    # A fresh interpreter: this test session may have imported triton for the kernel tests.
    proc = run_python("-c", FORWARD_ON_CPU)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
