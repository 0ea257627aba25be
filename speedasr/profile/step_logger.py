"""The monitors' common logging cadence: count training batches, log every N through the Trainer's
loggers at ``trainer.global_step``, warn once per problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, Trainer
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_warn

from speedasr.profile.batch_lengths import BatchLengths

BatchLengthsFn = Callable[[Any], BatchLengths | None]
"""Batch adapter: ``batch -> BatchLengths``, or None for a batch it does not describe."""


def log_dir(trainer: Trainer) -> Path:
    """Where the metrics go: the CSV logger's directory if any, else the first logger's, else the
    Trainer's ``default_root_dir`` (no collective call, unlike ``trainer.log_dir``)."""
    loggers = sorted(trainer.loggers, key=lambda lg: not isinstance(lg, CSVLogger))
    for lg in loggers:
        path = getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)
        if path:
            return Path(path)
    return Path(trainer.default_root_dir)


class StepLogger(Callback):
    """Logging cadence shared by the monitors: every ``log_every_n_steps`` training batches."""

    def __init__(self, log_every_n_steps: int | None) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be >= 0, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self._batches = 0  # training batches seen over the run (checkpointed)
        self._logged_at = 0  # value of _batches at the last log
        self._warned: set[str] = set()

    def _count_and_check(self, trainer: Trainer) -> bool:
        """Count one batch; True when this batch ends a logging interval."""
        self._batches += 1
        every = self.log_every_n_steps
        if every is None:
            every = trainer.log_every_n_steps
        return bool(every) and self._batches % every == 0

    def _log(self, trainer: Trainer, metrics: Mapping[str, float]) -> None:
        self._logged_at = self._batches
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(dict(metrics), step=trainer.global_step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def _lengths(self, fn: BatchLengthsFn, batch: Any) -> BatchLengths | None:
        lengths = fn(batch)
        if lengths is None:
            self._warn_once(
                "batch",
                f"cannot read lengths from a {type(batch).__name__} batch (known layouts: "
                "speedasr batches, (x, x_lens[, y, y_lens]) tuples, dicts with length or mask "
                "keys, ESPnet (ids, dict), icefall {inputs, supervisions}); such batches are not "
                "counted. Pass batch_lengths=fn (see speedasr.profile.batch_lengths).",
            )
        return lengths
