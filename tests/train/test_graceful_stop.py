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
    trainer = SimpleNamespace(global_step=4, world_size=2, strategy=_Strategy(other_rank_got))
    module = SimpleNamespace(device=torch.device("cpu"))
    stop.on_train_batch_start(trainer, module, None, 0)
    trainer.global_step = 5  # the optimizer stepped
    if other_rank_got:
        with pytest.raises(SIGTERMException):
            stop.on_train_batch_end(trainer, module, None, None, 0)
        assert stop.stopped_by == signal.SIGTERM
    else:
        stop.on_train_batch_end(trainer, module, None, None, 0)
        assert stop.stopped_by is None
