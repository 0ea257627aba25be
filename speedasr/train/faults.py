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
    continues exactly. A second Ctrl-C interrupts at once (Lightning's KeyboardInterrupt path, no
    checkpoint). ``exit_code`` is the shell's convention, 128 + the signal's number.

    Why not Lightning's own SIGTERM handling: it raises ``SIGTERMException`` on each rank as soon
    as that rank's own flag is set, so ranks that got the signal a moment apart stop after
    different batches, and a checkpoint saved then (a collective) deadlocks. Here the handlers only
    note the signal; at the end of each batch whose optimizer step ran, the ranks all-reduce the
    note and, if any rank got a signal, all raise ``SIGTERMException`` there. The checkpoint is
    written while that exception passes ``on_exception``, before Lightning tears the run down, in
    the same loop state as a step checkpoint. A process that started with a signal ignored (a
    background job of a script ignores SIGINT) keeps ignoring it.
    """

    STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.received: signal.Signals | None = None
        """The first stop signal this process received."""
        self.stopped_by: signal.Signals | None = None
        """The signal that stopped the run (on any rank); None while it runs."""
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._step_at_batch_start = 0

    @property
    def exit_code(self) -> int:
        return 128 + int(self.stopped_by or signal.SIGTERM)

    def on_train_start(self, trainer, pl_module) -> None:
        # Replaces Lightning's SIGTERM handler too; Lightning's teardown restores the handlers
        # it found before the run.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now
                raise KeyboardInterrupt
            return
        self.received = signal.Signals(signum)
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"{self.received.name}: stopping after this step{again}", file=sys.stderr)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # accumulating gradients: their sum is not in a checkpoint, go on
        received = torch.tensor([int(self.received or 0)])
        if trainer.world_size > 1:  # one decision for all ranks, at the same step
            received = trainer.strategy.reduce(received.to(pl_module.device), reduce_op="max")
        if int(received.item()):
            self.stopped_by = signal.Signals(int(received.item()))
            raise SIGTERMException

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.stopped_by is not None:
            trainer.save_checkpoint(str(self.checkpoint_path), weights_only=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    def message(self, step: int) -> str:
        """One line for the user: what stopped the run, and how to continue it."""
        name = (self.stopped_by or signal.SIGTERM).name
        return (
            f"training stopped by {name} after step {step}; checkpoint {self.checkpoint_path} "
            "(continue with --resume last)"
        )
