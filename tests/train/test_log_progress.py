"""Training progress into a log file: plain lines whose counters match the run.

Lightning's bar, redrawn every 100 steps into a log, showed an epoch bar whose total was the
remaining step budget and which never moved in epochs shorter than 100 batches ("Epoch 1: 0%,
0/735" at every epoch). ``LogProgressBar`` prints ``step n/total`` of the run and the epoch's batch.
"""

import io
import re
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch

from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.progress import LogProgressBar

TRAIN_LINE = re.compile(
    r"^train: step (\d+)/(\d+) \((\d+)%\), epoch (\d+), batch (\d+)(/\d+)?, .*train/loss=[\d.]+$"
)

# Every cut lasts 1.5-2.0 s and a packed batch holds at most 2.5 s of audio: one cut per batch,
# so an epoch over 5 cuts is 5 batches (= 5 optimizer steps).
CONFIG = """\
seed: 0
model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,
        subsampling_channels: 8}
sampler: {mode: packed, max_duration: 2.5, num_buckets: 2, num_token_buckets: 1}
optim: {lr: 0.003, warmup_steps: 1}
trainer: {max_epochs: null, max_steps: 12, val_check_interval: 8, check_val_every_n_epoch: null,
          log_every_n_steps: 1, accelerator: cpu, devices: 1}
monitors: {padding: false, gpu: false, throughput: false}
data: {num_workers: 0}
"""

# The CLI with the log-file bar printing every 4 steps instead of every 100.
RUN_TRAIN = """\
import sys
import speedasr.console
speedasr.console.LOG_REFRESH_STEPS = 4
from speedasr.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_train_into_a_log_file_prints_moving_step_counters(tmp_path):
    make_tiny_cuts(tmp_path / "train", n=5, seed=0, durations=(1.5, 2.0))
    make_tiny_cuts(tmp_path / "dev", n=2, seed=1, durations=(1.5, 2.0))
    Tokenizer.train(tiny_texts(100, seed=1), tmp_path / "tok", vocab_size=64)
    (tmp_path / "c.yaml").write_text(CONFIG)
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # a file, not a terminal: what a batch job's log sees
        proc = subprocess.run(
            [sys.executable, "-c", RUN_TRAIN, "--config", str(tmp_path / "c.yaml"),
             "--out_dir", str(tmp_path / "out"), "--data.tokenizer", str(tmp_path / "tok"),
             "--data.train_cuts", str(tmp_path / "train/cuts.jsonl.gz"),
             "--data.dev_cuts", str(tmp_path / "dev/cuts.jsonl.gz")],
            stdout=f, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = text.splitlines()
    train = [TRAIN_LINE.match(line) for line in lines if line.startswith("train: ")]
    assert all(train), [line for line in lines if line.startswith("train: ")]
    # (step, total, percent, epoch, batch of the epoch): 5 batches per epoch, a line every 4 steps.
    counters = [tuple(int(g) for g in m.groups()[:5]) for m in train]
    assert counters == [(4, 12, 33, 0, 4), (8, 12, 67, 1, 3), (12, 12, 100, 2, 2)]
    assert all(m.group(6) is None for m in train)  # lhotse's sampler has no length: no /N
    validation = [line for line in lines if line.startswith("validation: ")]
    assert len(validation) == 1 and validation[0].startswith("validation: step 8, epoch 1, ")
    assert "val/wer=" in validation[0]
    assert not any(line.startswith("Epoch ") or "\r" in line for line in lines)  # no tqdm bar


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "expected"),
    [
        # 10 samples in batches of 3: 4 batches per epoch, 2 per optimizer step (accumulation).
        (2, -1, [(1, 4, 25, 0, 2), (2, 4, 50, 0, 4), (3, 4, 75, 1, 2), (4, 4, 100, 1, 4)]),
        (5, 3, [(1, 3, 33, 0, 2), (2, 3, 67, 0, 4), (3, 3, 100, 1, 2)]),  # max_steps is less
    ],
)
def test_known_epoch_length_gives_batch_of_epoch_and_run_total(max_epochs, max_steps, expected):
    stream = io.StringIO()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(10, 2)), batch_size=3
    )
    trainer = pl.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, accumulate_grad_batches=2,
        callbacks=[LogProgressBar(every_n_steps=1, stream=stream)], logger=False,
        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_Linear(), loader)
    train = [TRAIN_LINE.match(line) for line in stream.getvalue().splitlines()]
    assert all(train), stream.getvalue()
    assert [tuple(int(g) for g in m.groups()[:5]) for m in train] == expected
    assert {m.group(6) for m in train} == {"/4"}


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1, got 0"):
        LogProgressBar(every_n_steps=0)
