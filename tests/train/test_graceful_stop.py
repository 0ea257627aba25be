"""GracefulStop in a plain Lightning project: a stop signal ends training after the current
optimizer step (never inside a gradient accumulation), on every rank after the same one, and
leaves a checkpoint. (The end-to-end runs, with resume, are in test_resume.py.)"""

import os
import signal
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from speedasr.train.faults import GracefulStop


@pytest.fixture(autouse=True)
def default_stop_signals():
    """Each test starts from Python's own handlers. A background job of a non-interactive shell
    inherits SIGINT ignored (`(make test &)`), and GracefulStop keeps an ignored signal ignored
    by design (nohup's contract), so without this the SIGINT cases failed there."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class _SignalsItself(pl.LightningModule):
    """y = w·x; sends ``sig`` to its own process during batch ``at``."""

    def __init__(self, sig: signal.Signals, at: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sig, self.at = sig, at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), self.sig)
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("sig", "accumulate", "stopped_at_step"),
    [
        (signal.SIGTERM, 1, 3),  # signalled in batch 2 (step 3): stops after it
        (signal.SIGINT, 2, 2),  # batch 2 starts step 2's accumulation; stops after batch 3
    ],
)
def test_a_signal_stops_after_the_current_step_with_a_checkpoint(
    sig, accumulate, stopped_at_step, tmp_path
):
    stop = GracefulStop(tmp_path / "last.ckpt")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[stop], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    before = signal.getsignal(sig)
    with pytest.raises(SIGTERMException):
        trainer.fit(_SignalsItself(sig, at=2), torch.utils.data.DataLoader(torch.randn(12, 4)))
    assert signal.getsignal(sig) == before  # handlers restored
    assert trainer.global_step == stopped_at_step
    assert stop.stopped_by == sig and stop.exit_code == 128 + sig
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == stopped_at_step


class _Strategy:
    """``reduce(max)`` over this rank and another rank that holds ``other``."""

    def __init__(self, other: int):
        self.other = other

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "max"
        return torch.maximum(tensor, torch.tensor([self.other]))


@pytest.mark.parametrize("other_rank_got", [0, int(signal.SIGTERM)])
def test_every_rank_stops_after_the_same_step(other_rank_got):
    stop = GracefulStop("unused.ckpt")  # this rank got no signal
    lightning = SimpleNamespace(received_sigterm=False)  # Lightning stops at the step's end if set
    trainer = SimpleNamespace(
        global_step=4, world_size=2, strategy=_Strategy(other_rank_got), _signal_connector=lightning
    )
    module = SimpleNamespace(device=torch.device("cpu"))
    stop.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 5  # the optimizer stepped
    stop.on_train_batch_end(trainer, module, None, None, 0)
    assert lightning.received_sigterm == bool(other_rank_got)
    assert stop.stopped_by == (signal.SIGTERM if other_rank_got else None)


class _SignalsInSetupOrSanityCheck(_SignalsItself):
    """Sends ``sig`` to its own process in ``setup`` or in the sanity-check validation."""

    def __init__(self, sig: signal.Signals, where: str):
        super().__init__(sig, at=-1)
        self.where = where

    def setup(self, stage):
        if self.where == "setup":
            os.kill(os.getpid(), self.sig)

    def validation_step(self, batch, batch_idx):
        if self.where == "sanity_check" and self.trainer.sanity_checking and batch_idx == 0:
            os.kill(os.getpid(), self.sig)
        return self.layer(batch).pow(2).mean()


@pytest.mark.parametrize("where", ["setup", "sanity_check"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_before_the_first_step_stops_without_claiming_a_checkpoint(sig, where, tmp_path):
    stop = GracefulStop(tmp_path / "last.ckpt")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[stop], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randn(8, 4))
    before = signal.getsignal(sig)
    with pytest.raises(SIGTERMException):
        trainer.fit(_SignalsInSetupOrSanityCheck(sig, where), data, data)
    assert signal.getsignal(sig) == before  # handlers restored
    assert trainer.global_step == 0 and not (tmp_path / "last.ckpt").exists()
    message = stop.message(trainer.global_step)
    assert f"stopped by {sig.name}" in message and "no checkpoint was written" in message
    assert "--resume" not in message
    assert stop.checkpoint_step is None and stop.exit_code == 128 + sig


class _LogsAtBatchEnd(pl.Callback):
    """Logs ``seen_batch`` at every batch's end, as LR/throughput/padding monitors do."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("seen_batch", float(batch_idx))


class _CountsValidation(_SignalsItself):
    def __init__(self, sig: signal.Signals, at: int):
        super().__init__(sig, at)
        self.validated_batches = 0

    def validation_step(self, batch, batch_idx):
        self.validated_batches += not self.trainer.sanity_checking
        return self.layer(batch).pow(2).mean()


def test_a_stop_at_a_checkpoint_step_finishes_that_step_as_an_uninterrupted_run_would(tmp_path):
    """Signalled in batch 2: step 3 ends as in a run without the signal: its step checkpoint is
    written (Lightning runs ModelCheckpoint's batch-end hook after every other callback's), every
    callback's log of step 3 is kept and the validation due at step 3 runs over all its batches;
    then the run stops with last.ckpt at step 3."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    every = ModelCheckpoint(
        dirpath=tmp_path, filename="step{step}", auto_insert_metric_name=False,
        every_n_train_steps=3, save_top_k=-1, monitor="step", mode="max",
    )  # fmt: skip
    stop = GracefulStop(tmp_path / "last.ckpt")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[every, stop, _LogsAtBatchEnd()],
        logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=1, val_check_interval=3,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = _CountsValidation(signal.SIGTERM, at=2)
    data = torch.utils.data.DataLoader(torch.randn(12, 4))
    with pytest.raises(SIGTERMException):
        trainer.fit(module, data, torch.utils.data.DataLoader(torch.randn(3, 4)))
    metrics = (tmp_path / "logs/version_0/metrics.csv").read_text()
    seen = [row.split(",") for row in metrics.splitlines()]
    column = seen[0].index("seen_batch")
    assert sorted({float(r[column]) for r in seen[1:] if r[column]}) == [0.0, 1.0, 2.0]
    assert module.validated_batches == 3
    assert trainer.global_step == 3
    step3 = torch.load(tmp_path / "step3.ckpt", weights_only=True)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert step3["global_step"] == last["global_step"] == 3
    for name, tensor in step3["state_dict"].items():
        assert torch.equal(tensor, last["state_dict"][name])
    assert stop.checkpoint_step == 3
