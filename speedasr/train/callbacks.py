"""Profiler callbacks for any PyTorch Lightning project: padding, GPU utilization, throughput.

Drop them into a Trainer; they log through the Trainer's loggers every ``log_every_n_steps``
training batches (the Trainer's setting unless given) and keep their run totals in checkpoints::

    trainer = Trainer(
        callbacks=[PaddingMonitor(), GPUUtilizationMonitor(), SpeechThroughputMonitor()]
    )

Batches are read through a batch adapter (``speedasr.profile.batch_lengths``): the default one knows
speedasr batches, ``(x, x_lens[, y, y_lens])`` tuples, dicts with length or mask keys, ESPnet's
``(ids, dict)`` and icefall's ``supervisions`` batches; pass your own ``batch_lengths=fn`` for
anything else. This module imports no speedasr model code.

Metrics describe the process that logs (global rank 0): Lightning's loggers only write there.
"""

from __future__ import annotations

import warnings
from typing import Any

from speedasr.profile.batch_lengths import BatchLengths, default_batch_lengths
from speedasr.profile.gpu_monitor import GPUUtilizationMonitor
from speedasr.profile.padding_monitor import PADDING_AXES, PaddingMonitor
from speedasr.profile.step_logger import BatchLengthsFn
from speedasr.profile.throughput_monitor import _OLD_NAME, SpeechThroughputMonitor

__all__ = [
    "BatchLengths",
    "BatchLengthsFn",
    "GPUUtilizationMonitor",
    "PADDING_AXES",
    "PaddingMonitor",
    "SpeechThroughputMonitor",
    "default_batch_lengths",
]

_warned_old_name = False


def __getattr__(name: str) -> Any:
    """``ThroughputMonitor``: the old name of ``SpeechThroughputMonitor``, for one release."""
    global _warned_old_name
    if name != _OLD_NAME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _warned_old_name:
        _warned_old_name = True
        warnings.warn(
            "speedasr.train.callbacks.ThroughputMonitor is renamed SpeechThroughputMonitor (the "
            "old name clashes with lightning.pytorch.callbacks.ThroughputMonitor) and will be "
            "removed in speedasr 0.2",
            FutureWarning,
            stacklevel=2,
        )
    return SpeechThroughputMonitor
