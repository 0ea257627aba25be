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

``GracefulStop`` (also a plain Lightning callback): SIGTERM or Ctrl-C stop training at the end of
the current batch and leave a checkpoint that resumes exactly.
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
    """SIGTERM or Ctrl-C (SIGINT) stop training at the end of the current batch, with a checkpoint
    written to ``checkpoint_path`` from which ``--resume`` continues exactly.

    Lightning already turns SIGTERM into a stop at the next batch boundary: it finishes the batch
    and its callbacks, then raises ``SIGTERMException`` (and tells the other ranks). This callback
    makes the first Ctrl-C do the same (a second one interrupts at once, as usual, without a
    checkpoint), and writes the checkpoint when that exception passes through ``on_exception``,
    before Lightning tears the run down. A crash inside a step writes nothing: its state is that
    of a half-done step. ``exit_code`` is the shell's convention, 128 + the signal's number.
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.signal: signal.Signals | None = None
        self._previous_sigint: Any = None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal or signal.SIGTERM)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installed its SIGTERM handler before this hook, and its teardown restores
        # every handler it found then, this SIGINT one included. A process started with SIGINT
        # ignored (a background job of a script) keeps ignoring it.
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame) -> None:
        if self.signal == signal.SIGINT:  # the second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.SIGINT
        print("Ctrl-C: stopping after this batch (press again to stop at once)", file=sys.stderr)
        lightning_sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(lightning_sigterm):  # no Lightning handler (Windows): stop now
            raise KeyboardInterrupt
        lightning_sigterm(signum, frame)  # flags the stop, forwards it to launched ranks

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.signal = self.signal or signal.SIGTERM
            trainer.save_checkpoint(str(self.checkpoint_path), weights_only=False)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def message(self, step: int) -> str:
        """One line for the user: what stopped the run, and how to continue it."""
        name = signal.Signals(self.signal or signal.SIGTERM).name
        return (
            f"training stopped by {name} after step {step}; checkpoint {self.checkpoint_path} "
            "(continue with --resume last)"
        )
