"""Exact resume: stop mid-epoch, resume from the checkpoint -> same batches, same weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedasr.data.datamodule import ResumableSampler
from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_metadata_cuts, make_tiny_cuts, tiny_texts
from speedasr.train.progress import batch_seed


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speedasr.cli", *args], capture_output=True, text=True, timeout=600
    )


TINY_CONFIG = """\
seed: 3
model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,
        subsampling_channels: 8, dropout: 0.1, attention_backend: torch}
sampler: {mode: packed, max_duration: 7.0, num_buckets: 2, num_token_buckets: 1}
optim: {lr: 0.003, warmup_steps: 2}
trainer: {max_epochs: null, max_steps: 7, enable_progress_bar: false, log_every_n_steps: 1,
          accelerator: cpu, devices: 1}
monitors: {padding: false, gpu: false, throughput: false}
checkpoint: {every_n_steps: 3, keep: -1}
record_batches: true
data: {num_workers: 1}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_tiny_cuts(root / "train", n=14, seed=0, speech=True)
    Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=96)
    (root / "c.yaml").write_text(TINY_CONFIG)
    return root


def train(root: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    proc = cli(
        "train", "--config", str(root / "c.yaml"), "--out_dir", str(root / out),
        "--data.train_cuts", str(root / "train/cuts.jsonl.gz"),
        "--data.tokenizer", str(root / "tok"), *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def batches(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_resume_mid_epoch_gives_identical_batches_and_weights(corpus):
    train(corpus, "full")
    full = batches(corpus / "full/batches_rank0.jsonl")
    assert [b["step"] for b in full] == list(range(7))
    epochs = [b["epoch"] for b in full]
    assert epochs[3] == epochs[2] == 0 and 1 in epochs  # step 3 is mid-epoch; epochs roll over

    ckpt = corpus / "full/checkpoints/step3.ckpt"
    assert ckpt.is_file()
    assert sorted(p.name for p in (corpus / "full/checkpoints").iterdir()) == [
        "last.ckpt", "step3.ckpt", "step6.ckpt",
    ]  # fmt: skip
    train(corpus, "resumed", "--resume", str(ckpt))
    resumed = batches(corpus / "resumed/batches_rank0.jsonl")
    assert resumed == full[3:]  # same cuts, same order, same epoch/index/step

    a = torch.load(corpus / "full/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(corpus / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 7
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name  # bitwise
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow
def test_resume_refuses_a_changed_model_or_data_config(corpus):
    ckpt = str(corpus / "full/checkpoints/step3.ckpt")
    if not Path(ckpt).is_file():
        train(corpus, "full")
    proc = cli(
        "train", "--config", str(corpus / "c.yaml"), "--out_dir", str(corpus / "bad"),
        "--data.train_cuts", str(corpus / "train/cuts.jsonl.gz"),
        "--data.tokenizer", str(corpus / "tok"), "--resume", ckpt, "--model.d_model=64",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "does not match this config" in proc.stderr and "model.d_model" in proc.stderr
    proc = cli(
        "train", "--config", str(corpus / "c.yaml"), "--out_dir", str(corpus / "bad2"),
        "--data.train_cuts", str(corpus / "train/cuts.jsonl.gz"),
        "--data.tokenizer", str(corpus / "tok"), "--resume", ckpt, "--sampler.max_duration=9",
    )  # fmt: skip
    assert proc.returncode == 2 and "sampler.max_duration" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", ["packed", "bucket1d", "random"])
def test_resumable_sampler_skips_to_the_same_batches(mode):
    cuts = make_metadata_cuts(120, seed=1)
    cfg = SamplerConfig(mode=mode, max_duration=60.0, num_buckets=4, num_token_buckets=2)

    def epoch_batches(skip: int | None = None, epoch: int = 1):
        sampler = ResumableSampler(build_sampler(cuts, cfg, None, seed=5), seed=5, rank=0)
        if skip is not None:
            sampler.skip(1, skip)  # resume state: 4 batches of epoch 1 consumed
        sampler.set_epoch(epoch)
        return [([c.id for c in b], s) for b, s in sampler]

    full = epoch_batches()
    assert len(full) > 6
    assert epoch_batches(skip=4) == full[4:]
    assert epoch_batches(skip=4, epoch=2) == epoch_batches(epoch=2)  # only in its epoch
    assert full[0][1] == batch_seed(5, 1, 0, 0)


def test_resume_last_takes_the_newest_checkpoint(tmp_path):
    import os

    from speedasr.errors import UserError
    from speedasr.train.builder import resolve_resume

    with pytest.raises(UserError, match="does not exist"):
        resolve_resume("last", tmp_path)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name, mtime in [("last.ckpt", 100), ("step2000.ckpt", 300), ("step1000.ckpt", 200)]:
        (ckpts / name).write_bytes(b"")
        os.utime(ckpts / name, (mtime, mtime))
    assert resolve_resume("last", tmp_path) == str(ckpts / "step2000.ckpt")
    assert resolve_resume(str(ckpts / "last.ckpt"), tmp_path) == str(ckpts / "last.ckpt")
