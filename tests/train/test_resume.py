"""Exact resume: a 3-epoch run with 5 batches per epoch, resumed from checkpoints written
mid-epoch, at an epoch's last batch, at the next epoch's first batch, after validation, and
after Ctrl-C, SIGTERM and kill -9, trains on the same batches in the same order and ends with
the same weights and optimizer state, bitwise. Checkpoints are written at exactly the configured
steps.

Cost: each training run is a subprocess (~6 s of imports, then ~0.5 s per step on 2 cores), so
one uninterrupted run provides every checkpoint, and the resumed runs start together.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_metadata_cuts, make_tiny_cuts, tiny_texts
from speedasr.train.resume import ResumableSampler, batch_seed

EPOCHS, BATCHES = 3, 5  # 14 tiny cuts pack into 5 batches per epoch
STEPS = EPOCHS * BATCHES

# Validation every N steps (check_val_every_n_epoch null), as the shipped recipes do: Lightning
# deferred the step checkpoint at an epoch's last batch to a validation that came later or never.
VALIDATE_EVERY = 2 * BATCHES
TINY_CONFIG = f"""\
seed: 3
model: {{d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,
        subsampling_channels: 8, dropout: 0.1, attention_backend: torch}}
sampler: {{mode: packed, max_duration: 7.0, num_buckets: 2, num_token_buckets: 1}}
optim: {{lr: 0.003, warmup_steps: 2}}
trainer: {{max_epochs: null, max_steps: {STEPS}, enable_progress_bar: false, log_every_n_steps: 1,
          accelerator: cpu, devices: 1, val_check_interval: {VALIDATE_EVERY},
          check_val_every_n_epoch: null}}
monitors: {{padding: false, gpu: false, throughput: false}}
checkpoint: {{every_n_steps: 1, keep: -1}}
record_batches: true
data: {{num_workers: 1}}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_tiny_cuts(root / "train", n=14, seed=0, speech=True)
    make_tiny_cuts(root / "dev", n=2, seed=5, speech=True)
    Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=96)
    (root / "c.yaml").write_text(TINY_CONFIG)
    return root


def start_train(root: Path, out: str, *extra: str) -> subprocess.Popen:
    """A training subprocess in its own process group (signals reach it and its workers, as a
    terminal's Ctrl-C does), with SIGINT handled even if this test runs with it ignored. Its
    stderr goes to ``out/stderr-N.txt`` (N counts the runs in ``out``)."""
    (root / out).mkdir(exist_ok=True)
    stderr_path = root / out / f"stderr-{len(list((root / out).glob('stderr-*.txt')))}.txt"
    command = [
        sys.executable, "-m", "speedasr.cli", "train", "--config", str(root / "c.yaml"),
        "--out_dir", str(root / out), "--data.train_cuts", str(root / "train/cuts.jsonl.gz"),
        "--data.dev_cuts", str(root / "dev/cuts.jsonl.gz"), "--data.tokenizer", str(root / "tok"),
        *extra,
    ]  # fmt: skip
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    proc.stderr_path = stderr_path
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Waits for the run; returns (exit code, its stderr)."""
    proc.wait(timeout=600)
    return proc.returncode, proc.stderr_path.read_text()


def train(root: Path, out: str, *extra: str) -> None:
    rc, stderr = finish(start_train(root, out, *extra))
    assert rc == 0, stderr[-3000:]


def batches(root: Path, out: str) -> dict[int, dict]:
    """Recorded batches by step (a step run twice, before a kill and after resuming: the last)."""
    rows = [json.loads(x) for x in (root / out / "batches_rank0.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def assert_same_final_state(root: Path, out: str, reference: str = "full") -> None:
    a = torch.load(root / reference / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(root / out / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), (out, name)  # bitwise
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for moment in sa[k]:
            assert torch.equal(sa[k][moment], sb[k][moment]), (out, k, moment)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.fixture(scope="module")
def full(corpus):
    """The uninterrupted run."""
    train(corpus, "full")
    return corpus


@pytest.mark.slow
def test_uninterrupted_run_writes_checkpoints_at_exactly_the_configured_steps(full):
    rows = batches(full, "full")
    assert sorted(rows) == list(range(STEPS))
    positions = [(rows[s]["epoch"], rows[s]["index"]) for s in range(STEPS)]
    assert positions == [(e, i) for e in range(EPOCHS) for i in range(BATCHES)]
    names = {p.name for p in (full / "full/checkpoints").iterdir()}
    best = {n for n in names if "-wer" in n}  # the one validation (and so the best)
    assert len(best) == 1 and best.pop().startswith(f"step{VALIDATE_EVERY}-wer")
    assert names - {n for n in names if "-wer" in n} == {
        "last.ckpt",
        *(f"step{s}.ckpt" for s in range(1, STEPS + 1)),
    }


@pytest.mark.slow
def test_resume_from_any_checkpoint_gives_the_same_batches_and_weights(full):
    ckpts = full / "full/checkpoints"
    (after_validation,) = ckpts.glob("step*-wer*.ckpt")  # after validating at epoch 1's end
    starts = {
        "mid_epoch": ckpts / "step7.ckpt",  # epoch 1, 2 batches consumed
        "last_batch": ckpts / "step10.ckpt",  # epoch 1 complete, before its validation
        "first_batch": ckpts / "step11.ckpt",  # epoch 2, 1 batch consumed
        "after_validation": after_validation,
    }
    runs = {name: start_train(full, name, "--resume", str(path)) for name, path in starts.items()}
    reference = batches(full, "full")
    for name, proc in runs.items():
        rc, stderr = finish(proc)
        assert rc == 0, stderr[-3000:]
        resumed = batches(full, name)
        step = torch.load(starts[name], weights_only=True)["global_step"]
        assert sorted(resumed) == list(range(step, STEPS)), name
        assert resumed == {s: reference[s] for s in resumed}, name  # cuts, epoch, index, step
        assert_same_final_state(full, name)


def stop_after(root: Path, out: str, stop: signal.Signals, batches_started: int, *extra: str):
    """Starts a run, sends ``stop`` to its process group once it has started that many more
    batches, and returns (exit code, stderr)."""
    record = root / out / "batches_rank0.jsonl"

    def started() -> int:
        return len(record.read_text().splitlines()) if record.exists() else 0

    before = started()
    proc = start_train(root, out, *extra)
    deadline = time.monotonic() + 600
    while proc.poll() is None and started() - before < batches_started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    if proc.poll() is None:
        os.killpg(proc.pid, stop)
    return finish(proc)


def assert_clean_stop(rc: int, stderr: str, stop: signal.Signals, root: Path, out: str) -> int:
    """Checks a stop's exit code, message and checkpoints; returns the step it stopped after."""
    assert rc == 128 + stop, stderr[-3000:]
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert f"training stopped by {stop.name} after step" in message
    assert "--resume last" in message
    step = int(message.split("after step ")[1].split(";")[0])
    ckpt = torch.load(root / out / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and 0 < step < STEPS
    # every step is a checkpoint step (every_n_steps: 1): the stop's step has its own too
    step_ckpt = torch.load(root / out / f"checkpoints/step{step}.ckpt", weights_only=True)
    assert step_ckpt["global_step"] == step
    return step


@pytest.mark.slow
def test_ctrl_c_sigterm_and_kill_leave_checkpoints_that_resume_exactly(full):
    """One run interrupted three times (its process group gets the signal, workers included),
    continued from the step checkpoint written at the first stop, then with ``--resume last``:
    the end state is that of the uninterrupted run."""
    rc, stderr = stop_after(full, "stopped", signal.SIGINT, 3)
    step = assert_clean_stop(rc, stderr, signal.SIGINT, full, "stopped")
    step_ckpt = str(full / f"stopped/checkpoints/step{step}.ckpt")
    rc, stderr = stop_after(full, "stopped", signal.SIGTERM, 4, "--resume", step_ckpt)
    assert_clean_stop(rc, stderr, signal.SIGTERM, full, "stopped")
    rc, stderr = stop_after(full, "stopped", signal.SIGKILL, 4, "--resume", "last")
    assert rc == -signal.SIGKILL
    train(full, "stopped", "--resume", "last")
    assert batches(full, "stopped") == batches(full, "full")
    assert_same_final_state(full, "stopped")


@pytest.mark.slow
def test_resume_refuses_a_changed_model_or_data_config(full):
    ckpt = str(full / "full/checkpoints/step7.ckpt")
    expected = {
        ("bad_model", "--model.d_model=64"): "does not match this config: model.d_model",
        ("bad_data", "--sampler.max_duration=9"): "cannot resume mid-epoch",
    }
    runs = {run: start_train(full, run[0], "--resume", ckpt, run[1]) for run in expected}
    for run, proc in runs.items():
        rc, stderr = finish(proc)
        assert rc == 2 and expected[run] in stderr, stderr[-2000:]


@pytest.mark.parametrize("mode", ["packed", "bucket1d", "random"])
def test_resumable_sampler_skips_to_the_same_batches(mode):
    cuts = make_metadata_cuts(120, seed=1)
    cfg = SamplerConfig(mode=mode, max_duration=60.0, num_buckets=4, num_token_buckets=2)

    def epoch_batches(resume: int | None = None, epoch: int = 1):
        sampler = ResumableSampler(build_sampler(cuts, cfg, None, seed=5), seed=5, rank=0)
        if resume is not None:
            sampler.resume(1, resume)  # resume state: that many batches of epoch 1 consumed
        sampler.set_epoch(epoch)
        return [([c.id for c in b], s) for b, s in sampler]

    full = epoch_batches()
    assert len(full) > 6
    assert epoch_batches(resume=4) == full[4:]
    assert full[0][1] == batch_seed(5, 1, 0, 0)
    assert full[4][1] == batch_seed(5, 1, 4, 0)  # labelled by its index in the epoch


def test_resumed_sampler_ignores_the_order_of_lightnings_calls():
    """Lightning starts the DataLoader iterator (which prefetches from this sampler) before it
    calls ``set_epoch`` with the resumed epoch; the resumed batches must not depend on that."""
    cuts = make_metadata_cuts(120, seed=1)
    cfg = SamplerConfig(mode="packed", max_duration=60.0, num_buckets=4, num_token_buckets=2)

    def sampler():
        return ResumableSampler(build_sampler(cuts, cfg, None, seed=5), seed=5, rank=0)

    def epoch(e: int) -> list:
        s = sampler()
        s.set_epoch(e)
        return [([c.id for c in b], seed) for b, seed in s]

    epoch1, epoch2 = epoch(1), epoch(2)
    s = sampler()
    s.resume(1, 3)  # the checkpoint: 3 batches of epoch 1 consumed
    batches_iter = iter(s)
    first = next(batches_iter)  # prefetched while the sampler is still at epoch 0
    s.set_epoch(1)
    resumed = [first, *batches_iter]
    assert [([c.id for c in b], seed) for b, seed in resumed] == epoch1[3:]
    assert list(s.yielded) == [(1, i) for i in range(3, len(epoch1))]

    s = sampler()
    s.resume(1, len(epoch1))  # the checkpoint was written at epoch 1's last batch
    batches_iter = iter(s)
    first = next(batches_iter)
    s.set_epoch(2)
    resumed = [first, *batches_iter]
    assert [([c.id for c in b], seed) for b, seed in resumed] == epoch2
    assert s.next_position() == (2, 0)


def test_data_position_follows_an_epoch_that_lightning_closed_early(tmp_path):
    """max_steps (or max_time) ending a run mid-epoch closes the epoch in Lightning's loop, and a
    run resumed from that final checkpoint starts the next epoch: the data must start it too."""
    from types import SimpleNamespace

    from speedasr.train.datamodule import AsrDataModule, DataConfig

    Tokenizer.train(tiny_texts(50, seed=1), tmp_path / "tok", vocab_size=60)
    data = AsrDataModule(DataConfig(tokenizer=str(tmp_path / "tok")), SamplerConfig(), n_mels=80)
    data.progress = {"epoch": 2, "batches": 2}
    data.trainer = SimpleNamespace(current_epoch=2, world_size=1)  # mid-epoch: as it is
    assert data.state_dict()["progress"] == {"epoch": 2, "batches": 2}
    data.trainer = SimpleNamespace(current_epoch=3, world_size=1)  # epoch 2 closed after 2
    assert data.state_dict()["progress"] == {"epoch": 3, "batches": 0}


def test_resume_last_takes_the_newest_checkpoint(tmp_path):
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


def test_a_fresh_run_into_a_dir_with_checkpoints_is_one_line_naming_it(tmp_path, capfd):
    from speedasr.cli import main

    ckpts = tmp_path / "exp/checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step40.ckpt").write_bytes(b"an earlier run")
    rc = main([
        "train", f"--out_dir={tmp_path / 'exp'}", "--data.train_cuts=cuts.jsonl.gz",
        "--data.tokenizer=tok", "--trainer.max_steps=5",
    ])  # fmt: skip
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert str(ckpts) in err[0] and "--resume last" in err[0] and "--out_dir" in err[0]
    assert "checkpoint.overwrite=true" in err[0]
    assert (ckpts / "step40.ckpt").read_bytes() == b"an earlier run"  # refused before any work


def test_overwrite_deletes_an_earlier_runs_checkpoints_only_for_a_fresh_run(tmp_path):
    from speedasr.train.builder import check_fresh_start

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("last.ckpt", "step40.ckpt", "step40-wer0.500.ckpt"):
        (ckpts / name).write_bytes(b"an earlier run")
    check_fresh_start(tmp_path, resume="last", overwrite=True)  # resuming: nothing to check
    assert len(list(ckpts.iterdir())) == 3
    check_fresh_start(tmp_path, resume=None, overwrite=True)
    assert list(ckpts.iterdir()) == []
    check_fresh_start(tmp_path, resume=None, overwrite=False)  # empty: a fresh start is fine
