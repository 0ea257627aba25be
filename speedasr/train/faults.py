"""Fault tolerance for long runs: bad steps are skipped and counted, bad cuts reported.

``FaultMonitor`` (a Lightning callback, usable in any Lightning project):

* **Non-finite loss or gradients.** After backward and before the optimizer (and before gradient
  clipping), if the loss of any micro-batch since the last step, or any gradient, is NaN/inf, all
  gradients are dropped (``p.grad = None``): the optimizer leaves every parameter and its moments
  untouched, and training continues with the next batch. In data-parallel training the decision is
  all-reduced, so every rank skips the same step (FSDP shards gradients; DDP's are identical).
* **Empty batches** (every cut of the batch failed to load) are skipped the same way; the model
  returns a zero loss for them so that ranks stay in lock step.
* **Cuts whose audio fails to load mid-training** (``batch.skipped_cut_ids``, left out by the
  dataset) are counted and listed.

Counts are logged (``faults/skipped_steps``, ``faults/skipped_cuts``), saved in checkpoints and
summarized by ``summary()``.

``GracefulStop`` (also a plain Lightning callback): SIGTERM or Ctrl-C stop training after the
current step, on every rank after the same one, and leave a checkpoint that resumes exactly.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException


class FaultMonitor(pl.Callback):
    """Skips optimizer steps with non-finite loss/gradients or no data; counts skipped cuts."""

    def __init__(self, max_listed_cuts: int = 10000) -> None:
        self.max_listed_cuts = max_listed_cuts
        self.skipped_steps: Counter[str] = Counter()
        self.skipped_cuts: list[str] = []
        self.num_skipped_cuts = 0
        self._bad_loss = False
        self._empty = False

    # --- per batch ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        skipped = tuple(getattr(batch, "skipped_cut_ids", ()))
        if skipped:
            self.num_skipped_cuts += len(skipped)
            room = self.max_listed_cuts - len(self.skipped_cuts)
            self.skipped_cuts += list(skipped[: max(room, 0)])
        size = getattr(batch, "batch_size", None)
        self._empty = self._empty or size == 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad_grad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params)
        flags = torch.tensor([self._empty, self._bad_loss, bad_grad], dtype=torch.float32)
        if trainer.world_size > 1:  # every rank must skip the same steps
            flags = trainer.strategy.reduce(flags.to(pl_module.device), reduce_op="max").cpu()
        empty, bad_loss, bad_grad = (bool(f) for f in flags)
        self._empty = self._bad_loss = False
        if not (empty or bad_loss or bad_grad):
            return
        reason = "empty_batch" if empty else "non_finite_loss" if bad_loss else "non_finite_grad"
        self.skipped_steps[reason] += 1
        for p in params:
            p.grad = None
        pl_module.log("faults/skipped_steps", float(sum(self.skipped_steps.values())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.num_skipped_cuts:
            pl_module.log("faults/skipped_cuts", float(self.num_skipped_cuts))

    # --- reporting and checkpoints ------------------------------------------------------------
    def summary(self) -> str:
        steps = sum(self.skipped_steps.values())
        text = f"Faults: {steps} optimizer steps skipped"
        if steps:
            text += (
                " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped_steps.items())) + ")"
            )
        text += f", {self.num_skipped_cuts} cuts skipped mid-training (audio failed to load)."
        return text

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": dict(self.skipped_steps),
            "skipped_cuts": list(self.skipped_cuts),
            "num_skipped_cuts": self.num_skipped_cuts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = Counter(state.get("skipped_steps", {}))
        self.skipped_cuts = list(state.get("skipped_cuts", []))
        self.num_skipped_cuts = int(state.get("num_skipped_cuts", 0))


class GracefulStop(pl.Callback):
    """SIGTERM or Ctrl-C (SIGINT) stop training after the current optimizer step, on every rank
    after the same one, with a checkpoint written to ``checkpoint_path`` from which ``--resume``
    continues exactly. A signal before the first step (setup, sanity-check validation) stops the
    run when training would start, with no checkpoint (``checkpoint_step`` stays None). A second
    Ctrl-C interrupts this process at once (Lightning's KeyboardInterrupt path, no checkpoint;
    under DDP other ranks see docs/training.md). ``exit_code`` is the shell's convention, 128 +
    the signal's number.

    Why not Lightning's own SIGTERM handling: it raises ``SIGTERMException`` on each rank as soon
    as that rank's own flag is set, so ranks that got the signal a moment apart stop after
    different batches, and a checkpoint saved then (a collective) deadlocks. Here the handlers only
    note the signal; at the end of each batch whose optimizer step ran, the ranks all-reduce the
    note and, if any rank got a signal, all set Lightning's SIGTERM flag there. Lightning checks
    it once the step is over (every callback's batch-end hook has run, ModelCheckpoint's last, the
    step's metrics are logged, a validation due at that step has run; at an epoch's last batch,
    the epoch's end too) and raises ``SIGTERMException``. The checkpoint is written while that
    exception passes ``on_exception``, in the state of a checkpoint written after that step.
    (``trainer.should_stop`` would also finish the step, but it ends the epoch, so a resume would
    skip the epoch's remaining batches, it forces a validation and ``min_steps`` overrides it.)

    The handlers are ours from ``setup`` to the end of the fit, also while Lightning's own
    SIGTERM handler would be installed. A process that started with a signal ignored (a background
    job of a script ignores SIGINT) keeps ignoring it.
    """

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: signal.Signals | None = None
        """The first stop signal this process received."""
        self.stopped_by: signal.Signals | None = None
        """The signal that stopped the run (on any rank); None while it runs."""
        self.checkpoint_step: int | None = None
        """The global step of the checkpoint written at the stop; None when none was written."""
        self._stop_after_step = False
        self._training = False
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._step_at_batch_start = 0

    @property
    def exit_code(self) -> int:
        return 128 + int(self.stopped_by or self.received or signal.SIGTERM)

    # --- signal handlers, from the fit's start to its end ------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.received = self.stopped_by = self.checkpoint_step = None
        self._stop_after_step = self._training = False
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {
                sig: handler
                for sig in self.STOP_SIGNALS
                if (handler := signal.getsignal(sig)) is not None  # None: not set from Python
            }
        self._take_signals(trainer)

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_signals(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_signals(trainer)
        self._training = True
        if self._any_rank_received(trainer, pl_module):  # before the first step: nothing to save
            raise SIGTERMException

    def _take_signals(self, trainer) -> None:
        """Installs our handlers. Called again after Lightning installed its SIGTERM handler
        (between ``on_fit_start`` and the sanity check), which this one replaces."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, signal.SIG_IGN if previous is signal.SIG_IGN else self._on_signal)
        lightning = trainer._signal_connector  # Lightning 2.x internals, see _set_lightning_flag
        # Lightning restores, at its teardown, the handlers it found when it installed its own:
        # ours, since setup. Let it restore those from before the fit.
        for sig in lightning._original_handlers.keys() & self._previous_handlers.keys():
            lightning._original_handlers[sig] = self._previous_handlers[sig]
        if lightning.received_sigterm:  # got by Lightning's handler before ours took over
            lightning.received_sigterm = False
            self._on_signal(signal.SIGTERM, None)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now
                raise KeyboardInterrupt
            return
        self.received = signal.Signals(signum)
        when = "after this step" if self._training else "before training starts"
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"{self.received.name}: stopping {when}{again}", file=sys.stderr)

    # --- the stop -------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # accumulating gradients: their sum is not in a checkpoint, go on
        if self._any_rank_received(trainer, pl_module):
            self._stop_after_step = True
            _set_lightning_flag(trainer, True)  # Lightning stops once this step is over

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._stop_after_step:  # the validation due at the last step runs over all batches
            _set_lightning_flag(trainer, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._stop_after_step:
            _set_lightning_flag(trainer, True)

    def _any_rank_received(self, trainer, pl_module) -> bool:
        """Whether any rank got a stop signal (sets ``stopped_by``); a collective in DDP, so
        every rank calls it at the same point."""
        received = torch.tensor([int(self.received or 0)])
        if trainer.world_size > 1:  # one decision for all ranks, at the same step
            received = trainer.strategy.reduce(received.to(pl_module.device), reduce_op="max")
        if int(received.item()):
            self.stopped_by = signal.Signals(int(received.item()))
        return self.stopped_by is not None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self._stop_after_step:
            trainer.save_checkpoint(str(self.checkpoint_path), weights_only=False)
            self.checkpoint_step = trainer.global_step
        self._restore_signals()  # Lightning does too, but only once it had installed its own

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_signals()

    def message(self, step: int) -> str:
        """One line for the user: what stopped the run, and how to continue it."""
        name = signal.Signals(self.exit_code - 128).name
        if self.checkpoint_step is None:
            when = f"after step {step}" if self._stop_after_step else "before its first step"
            return f"training stopped by {name} {when}; no checkpoint was written"
        return (
            f"training stopped by {name} after step {self.checkpoint_step}; checkpoint "
            f"{self.checkpoint_path} (continue with --resume last)"
        )


def _set_lightning_flag(trainer, stop: bool) -> None:
    """Sets the flag Lightning's own SIGTERM handler sets (``trainer.received_sigterm``, kept by
    its signal connector, pytorch_lightning 2.x): its training loop raises ``SIGTERMException``
    at the end of a step while the flag is set, and its validation loop after a batch."""
    trainer._signal_connector.received_sigterm = stop
