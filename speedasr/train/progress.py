"""``LogProgressBar``: training progress as plain lines where the output is a log file.

Exact resume is ``speedasr.train.resume``; host memory, ``speedasr.train.host_memory``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import torch
from pytorch_lightning.callbacks import ProgressBar


class LogProgressBar(ProgressBar):
    """Training progress as plain lines, for a log file (Lightning's bar suits a terminal).

    Every ``every_n_steps`` optimizer steps, and when training ends, one line such as::

        train: step 200/800 (25%), epoch 3, batch 12, 1.9 steps/s, 1:45 elapsed, 5:16 left,
        train/loss=2.345   (on one line)

    Steps count optimizer updates of the whole run (``trainer.global_step``, which a resumed run
    continues); the total is ``trainer.max_steps``, or ``max_epochs`` times the epoch's length when
    the loader has one (unknown for lhotse's samplers: then no total). ``batch`` counts the
    epoch's batches so far, ``/N`` added when the epoch length is known. After each validation, one
    line with its metrics. Lightning's ``TQDMProgressBar`` would instead draw an epoch bar whose
    total is the remaining step budget and which redraws only at multiples of its refresh rate
    within an epoch: in epochs shorter than that it printed ``Epoch 1: 0%, 0/735`` and never moved.
    """

    def __init__(self, every_n_steps: int = 100, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._start_time = 0.0
        self._start_step = 0
        self._printed_step = -1
        self._epoch = self._batch = 0  # of the last training batch

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            stream = self.stream if self.stream is not None else sys.stderr
            print(*args, file=stream, flush=True, **kwargs)

    def total_steps(self, trainer) -> int | None:
        """Optimizer steps the run will take, or None when unknown (no max_steps and an epoch of
        unknown length)."""
        totals = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            totals.append(trainer.max_steps)
        epoch = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(epoch):
            steps_per_epoch = math.ceil(epoch / trainer.accumulate_grad_batches)
            totals.append(trainer.max_epochs * steps_per_epoch)
        return min(totals) if totals else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_time = time.monotonic()
        self._start_step = self._printed_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._epoch, self._batch = trainer.current_epoch, batch_idx + 1
        step = trainer.global_step
        if step != self._printed_step and step % self.every_n_steps == 0:
            self._print_train(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._printed_step:
            self._print_train(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val")
        }
        self.print(
            f"validation: step {trainer.global_step}, epoch {trainer.current_epoch}"
            + _format_metrics(metrics)
        )

    def _print_train(self, trainer, pl_module) -> None:
        step, total = trainer.global_step, self.total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        epoch_batches = trainer.num_training_batches
        known = math.isfinite(epoch_batches)
        parts.append(
            f"epoch {self._epoch}, batch {self._batch}" + (f"/{epoch_batches}" if known else "")
        )
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} steps/s, {_clock(elapsed)} elapsed")
            if total:
                parts.append(f"{_clock(max(total - step, 0) / rate)} left")
        metrics = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("train")
        }
        self.print("train: " + ", ".join(parts) + _format_metrics(metrics))
        self._printed_step = step


def _format_metrics(metrics: dict[str, Any]) -> str:
    items = []
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        items.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return (", " + ", ".join(items)) if items else ""


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
