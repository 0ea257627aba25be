"""``SpeechThroughputMonitor``: batches, utterances, frames, tokens, audio seconds and FLOPs per
second of training, and MFU (``speedasr.train.callbacks`` exports it)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer

from speedasr.profile.batch_lengths import BatchLengths, PendingLengths, default_batch_lengths
from speedasr.profile.flops import peak_flops
from speedasr.profile.step_logger import BatchLengthsFn, StepLogger

_COUNTERS = ("batches", "utterances", "frames", "tokens", "audio_seconds", "flops", "train_seconds")
_RATES = ("batches", "utterances", "frames", "tokens", "audio_seconds", "flops")
_OPTIONAL = ("tokens", "audio_seconds", "flops")
_OLD_NAME = "ThroughputMonitor"
"""The old name of ``SpeechThroughputMonitor`` (``speedasr.train.callbacks`` answers to it)."""


class SpeechThroughputMonitor(StepLogger):
    """Real (non-padding) work per second of training, and model FLOPs utilization (MFU).

    Named apart from Lightning's ``ThroughputMonitor`` (samples/s from the batch size, no notion
    of padding); both can run in one Trainer. Before speedasr 0.2 this class was called
    ``ThroughputMonitor`` too: that name still imports, with a deprecation warning.

    Logged over each logging interval (wall time of training batches, validation excluded, the
    device synchronized at the interval's end): ``throughput/batches_per_sec``,
    ``utterances_per_sec``, ``frames_per_sec`` (real input frames), ``tokens_per_sec`` (real output
    tokens; absent without outputs), ``audio_seconds_per_sec`` (when batches carry durations or
    ``frame_shift`` is set), ``flops_per_sec`` and ``mfu`` (when FLOPs are known), and
    ``throughput/train_seconds`` (training time so far). Rates are per device; multiply by the
    world size for the job. ``summary()`` and ``rates()`` give whole-run rates (run totals over
    training time), which is lower than the median of the logged intervals (``speedasr
    profile``) when some intervals are slow (start-up, data loading stalls).

    Args:
        batch_lengths: batch adapter; default ``default_batch_lengths``.
        flops_per_batch: training FLOPs (forward + backward) of one batch, e.g. from speedasr's
            planner. Default: the LightningModule's ``flops_per_batch(batch)`` method if it has one;
            else no FLOPs/MFU. Count real (unpadded) work so that MFU shows the cost of padding.
        flops_per_audio_second: instead of ``flops_per_batch``, training FLOPs per second of audio
            (a linear approximation: it ignores attention's quadratic term).
        peak_flops: peak FLOP/s of one device for MFU: a number, or ``{name substring: FLOP/s}``
            for devices missing from Lightning's table (``get_available_flops``), which is used
            otherwise with the Trainer's precision.
        log_every_n_steps: logging interval in training batches; default the Trainer's.
        frame_shift: seconds per input frame, to derive audio seconds when batches carry no
            durations (None: no audio seconds for such batches).
    """

    def __init__(
        self,
        batch_lengths: BatchLengthsFn | None = None,
        *,
        flops_per_batch: Callable[[Any], float] | None = None,
        flops_per_audio_second: float | None = None,
        peak_flops: float | Mapping[str, float] | None = None,
        log_every_n_steps: int | None = None,
        frame_shift: float | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        if flops_per_batch is not None and flops_per_audio_second is not None:
            raise ValueError("give flops_per_batch or flops_per_audio_second, not both")
        self.batch_lengths = batch_lengths or default_batch_lengths
        self.flops_per_batch = flops_per_batch
        self.flops_per_audio_second = flops_per_audio_second
        self.peak_flops = peak_flops
        self.frame_shift = frame_shift
        self.totals = dict.fromkeys(_COUNTERS, 0.0)
        self._interval = dict.fromkeys(_COUNTERS, 0.0)
        self._has = set()  # counters that are known ("tokens", "audio_seconds", "flops")
        self._pending = PendingLengths()
        self._flops_fn: Callable[[Any], float] | None = None
        self._peak: float | None = None
        self._device: torch.device | None = None
        self._t_last: float | None = None  # perf_counter at the last resume point; None = paused
        self._training = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flops_fn = self.flops_per_batch or getattr(pl_module, "flops_per_batch", None)
        self._device = trainer.strategy.root_device
        if self.flops_per_audio_second is not None:
            self._flops_fn = None
        has_flops = self._flops_fn is not None or self.flops_per_audio_second is not None
        self._peak = self._resolve_peak(trainer) if has_flops else None
        self._t_last = time.perf_counter()
        self._training = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lengths = self._lengths(self.batch_lengths, batch)
        if lengths is not None:
            self._pending.add(trainer.global_step, lengths)
        self._interval["batches"] += 1
        if self._flops_fn is not None:
            self._interval["flops"] += float(self._flops_fn(batch))
            self._has.add("flops")
        if self._count_and_check(trainer):
            self._log(trainer, self._close_interval())
        else:
            for _, ready in self._pending.drain(wait=False):
                self._count(ready)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._training:  # validation inside fit: the training clock resumes
            self._t_last = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._interval["batches"]:
            self._log(trainer, self._close_interval())
        self._t_last = None
        self._training = False

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "has": sorted(self._has), "batches": self._batches}

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints written before the rename keep this state under the old class name; move it
        # to ours so that Lightning restores it (a state without "totals" is someone else's).
        states = checkpoint.get("callbacks") or {}
        old = states.get(_OLD_NAME)
        if self.state_key not in states and isinstance(old, Mapping) and "totals" in old:
            states[self.state_key] = states.pop(_OLD_NAME)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = {k: float(state["totals"].get(k, 0.0)) for k in _COUNTERS}
        self._has = set(state["has"])
        self._batches = self._logged_at = int(state["batches"])

    def rates(self, counters: Mapping[str, float] | None = None) -> dict[str, float]:
        """Per-second rates of ``counters`` (default: run totals), as logged."""
        c = self.totals if counters is None else counters
        seconds = c["train_seconds"]
        if seconds <= 0:
            return {}
        out = {f"throughput/{k}_per_sec": c[k] / seconds for k in _RATES if self._known(k)}
        if "throughput/flops_per_sec" in out and self._peak:
            out["throughput/mfu"] = out["throughput/flops_per_sec"] / self._peak
        return out

    def summary(self) -> str:
        """One line for the end of a run: whole-run rates, i.e. run totals / training time."""
        r = self.rates()
        if not r:
            return "Throughput: no training batches timed."
        t = self.totals
        parts = [f"{r['throughput/utterances_per_sec']:.1f} utterances/s"]
        parts.append(f"{r['throughput/frames_per_sec']:,.0f} real frames/s")
        if "throughput/tokens_per_sec" in r:
            parts.append(f"{r['throughput/tokens_per_sec']:,.0f} real tokens/s")
        if "throughput/audio_seconds_per_sec" in r:
            parts.append(f"{r['throughput/audio_seconds_per_sec']:,.1f} audio s/s")
        if "throughput/flops_per_sec" in r:
            parts.append(f"{r['throughput/flops_per_sec'] / 1e12:.3g} TFLOP/s")
        if "throughput/mfu" in r:
            parts.append(f"MFU {100 * r['throughput/mfu']:.1f}%")
        return (
            f"Throughput per device, whole run (run totals / {t['train_seconds']:.1f} s of "
            f"training, {t['batches']:.0f} batches): " + ", ".join(parts)
        )

    # --- internals ---

    def _known(self, counter: str) -> bool:
        return counter not in _OPTIONAL or counter in self._has

    def _pause(self) -> None:
        if self._t_last is not None:
            self._interval["train_seconds"] += time.perf_counter() - self._t_last
            self._t_last = None

    def _close_interval(self) -> dict[str, float]:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # queued kernels belong to this interval
        self._pause()
        self._t_last = time.perf_counter()
        for _, lengths in self._pending.drain():
            self._count(lengths)
        interval, self._interval = self._interval, dict.fromkeys(_COUNTERS, 0.0)
        for k in _COUNTERS:
            self.totals[k] += interval[k]
        metrics = self.rates(interval)
        metrics["throughput/train_seconds"] = self.totals["train_seconds"]
        return metrics

    def _count(self, lengths: BatchLengths) -> None:
        c = self._interval
        c["utterances"] += lengths.batch_size
        c["frames"] += sum(lengths.input_lengths)
        if lengths.output_lengths is not None:
            c["tokens"] += sum(lengths.output_lengths)
            self._has.add("tokens")
        seconds = None
        if lengths.durations is not None:
            seconds = sum(lengths.durations)
        elif self.frame_shift is not None:
            seconds = sum(lengths.input_lengths) * self.frame_shift
        if seconds is not None:
            c["audio_seconds"] += seconds
            self._has.add("audio_seconds")
            if self.flops_per_audio_second is not None:
                c["flops"] += seconds * self.flops_per_audio_second
                self._has.add("flops")

    def _resolve_peak(self, trainer: Trainer) -> float | None:
        peak, problem = peak_flops(self._device, trainer.precision, self.peak_flops)
        if problem:
            self._warn_once("peak", f"{problem}; pass peak_flops=... for MFU")
        return peak
