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

import json
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer

from speedasr.core.geometry import GIB, encoder_length
from speedasr.data.padding import PaddingStats
from speedasr.profile.batch_lengths import BatchLengths, PendingLengths, default_batch_lengths
from speedasr.profile.flops import peak_flops
from speedasr.profile.gpu import GPUSampler, GPUSampleSource, NvmlSource, UtilizationWindow
from speedasr.profile.logs import SHAPES_FILE
from speedasr.profile.step_logger import BatchLengthsFn, StepLogger, log_dir

__all__ = [
    "BatchLengths",
    "BatchLengthsFn",
    "GPUUtilizationMonitor",
    "PADDING_AXES",
    "PaddingMonitor",
    "SpeechThroughputMonitor",
    "default_batch_lengths",
]

"""Per-batch shape samples written by ``PaddingMonitor`` next to the logger's metrics file."""

PADDING_AXES = {
    "frames": "padding_frames",
    "encoder_frames": "padding_encoder_frames",
    "tokens": "padding_tokens",
    "attention": "padding_attention",
    "encoder_self_attention": "padding_attention_encoder",
    "decoder_self_attention": "padding_attention_decoder",
    "cross_attention": "padding_attention_cross",
}
"""Axes ``PaddingMonitor`` can report, and their ``PaddingStats.fractions()`` keys. ``attention``
is the sum of the three attention kinds (score entries computed, a proxy for their FLOPs)."""
DEFAULT_AXES = ("frames", "encoder_frames", "tokens", "attention")
"""What an attention encoder-decoder computes (speedasr's models); name yours with ``axes=``."""
_NEEDS_OUTPUTS = frozenset({"tokens", "decoder_self_attention", "cross_attention"})


def _fmt_pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _check_axes(axes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(axes, str):
        axes = (axes,)
    chosen = tuple(dict.fromkeys(axes))  # order kept, repeats dropped
    unknown = [a for a in chosen if a not in PADDING_AXES]
    if unknown or not chosen:
        raise ValueError(
            f"axes: {'unknown axis ' + repr(unknown[0]) if unknown else 'no axis given'}; "
            f"choose from {', '.join(PADDING_AXES)}"
        )
    return chosen


class PaddingMonitor(StepLogger):
    """Fraction of computed frames, tokens and attention scores that are padding.

    Logged every ``log_every_n_steps`` batches (fractions 0-1, ``1 - real / computed``):
    ``padding/step/<axis>`` for the last batch, ``padding/window/<axis>`` over the last ``window``
    batches and ``padding/total/<axis>`` over the run, for the ``axes`` your model has (default
    ``frames``, ``encoder_frames``, ``tokens`` and ``attention``: encoder self + decoder self +
    cross, as in an attention encoder-decoder). Axes that need outputs (``tokens``,
    ``decoder_self_attention``, ``cross_attention``) are absent when batches have no output
    sequence, and ``attention`` is then encoder self-attention only. Ratios are of sums (a long
    padded batch weighs more than a short one), counted by ``speedasr.data.padding``.

    Every ``shape_sample_every``-th batch is also appended to ``batch_shapes.jsonl`` in the logger's
    directory (~150 bytes per line; ``speedasr profile`` draws the batch shape map from it).

    Args:
        batch_lengths: batch adapter; default ``default_batch_lengths``.
        axes: what your model computes over, from ``PADDING_AXES``: e.g. ``("frames", "tokens")``
            for an LSTM encoder-decoder without attention, ``("frames", "encoder_frames",
            "encoder_self_attention")`` for a CTC conformer. Default ``DEFAULT_AXES``.
        window: batches in the windowed fraction.
        log_every_n_steps: logging interval in training batches; default the Trainer's.
        encoder_length: encoder frames of an input of T frames; default speedasr's 3 stride-2
            stages (T/8). Use ``lambda t: t`` for a model that does not subsample.
        frame_shift: seconds per input frame, for the shape map when batches carry no durations
            (None: the map uses frames).
        shapes_file: file name in the log directory, or None to write no shape samples.
        shape_sample_every: write one batch in this many.
    """

    def __init__(
        self,
        batch_lengths: BatchLengthsFn | None = None,
        *,
        axes: Iterable[str] = DEFAULT_AXES,
        window: int = 100,
        log_every_n_steps: int | None = None,
        encoder_length: Callable[[int], int] = encoder_length,
        frame_shift: float | None = None,
        shapes_file: str | None = SHAPES_FILE,
        shape_sample_every: int = 1,
    ) -> None:
        super().__init__(log_every_n_steps)
        if window < 1 or shape_sample_every < 1:
            raise ValueError("window and shape_sample_every must be >= 1")
        self.batch_lengths = batch_lengths or default_batch_lengths
        self.axes = _check_axes(axes)
        self.window = window
        self.encoder_length = encoder_length
        self.frame_shift = frame_shift
        self.shapes_file = shapes_file
        self.shape_sample_every = shape_sample_every
        self.totals = PaddingStats()
        self.has_tokens = False
        self.layouts: set[str] = set()  # "packed" / "padded"
        self._window: deque[PaddingStats] = deque(maxlen=window)
        self._last: PaddingStats | None = None
        self._pending = PendingLengths()
        self._shape_records: list[dict[str, Any]] = []
        self._shapes_path: Path | None = None
        self._counted = 0  # batches counted (recognized by the adapter), for shape sampling

    # --- Lightning hooks ---

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shapes_file and trainer.is_global_zero:
            self._shapes_path = log_dir(trainer) / self.shapes_file

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lengths = self._lengths(self.batch_lengths, batch)
        if lengths is not None:
            self._pending.add(trainer.global_step, lengths)
        if self._count_and_check(trainer):
            self._update()
            self._log(trainer, self._metrics())
            self._write_shapes()
        else:
            self._update(wait=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._update()
        if self._batches > self._logged_at and self._last is not None:
            self._log(trainer, self._metrics())
        self._write_shapes()

    def state_dict(self) -> dict[str, Any]:
        self._update()
        return {
            "totals": asdict(self.totals),
            "window": [asdict(s) for s in self._window],
            "has_tokens": self.has_tokens,
            "layouts": sorted(self.layouts),
            "batches": self._batches,
            "counted": self._counted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = PaddingStats(**state["totals"])
        self._window = deque((PaddingStats(**s) for s in state["window"]), maxlen=self.window)
        self.has_tokens = bool(state["has_tokens"])
        self.layouts = set(state["layouts"])
        self._batches = self._logged_at = int(state["batches"])
        self._counted = int(state["counted"])

    # --- results ---

    def fractions(self) -> dict[str, float]:
        """Padding fraction (0-1) per chosen axis over the run; axes that need outputs only if
        batches had them."""
        return self._axes(self.totals)

    def summary(self) -> str:
        """A few lines for the end of a run: padding per axis over all batches seen (rank 0)."""
        s = self.totals
        if s.batches == 0:
            return "Padding: no batches seen."
        f = s.fractions()
        layout = "/".join(sorted(self.layouts)) or "unknown"
        width = max(15, *(len(a) + 1 for a in self.axes))
        lines = [f"Padding over {s.batches:,} batches, {s.utterances:,} utterances ({layout}):"]
        for axis in self.axes:
            name = axis.replace("_", " ")
            if axis in _NEEDS_OUTPUTS and not self.has_tokens:
                lines.append(f"  {name:<{width}} absent (batches have no output sequence)")
                continue
            line = f"  {name:<{width}} {_fmt_pct(f[PADDING_AXES[axis]])}"
            if axis == "attention" and self.has_tokens:
                line += (
                    f"  (encoder self {_fmt_pct(f['padding_attention_encoder']).strip()}, "
                    f"decoder self {_fmt_pct(f['padding_attention_decoder']).strip()}, "
                    f"cross {_fmt_pct(f['padding_attention_cross']).strip()})"
                )
            elif axis == "attention":
                line += "  (encoder self only)"
            lines.append(line)
        return "\n".join(lines)

    # --- internals ---

    def _axes(self, stats: PaddingStats) -> dict[str, float]:
        f = stats.fractions()
        return {
            axis: f[PADDING_AXES[axis]]
            for axis in self.axes
            if self.has_tokens or axis not in _NEEDS_OUTPUTS
        }

    def _metrics(self) -> dict[str, float]:
        if self._last is None:
            return {}
        window = sum(self._window, PaddingStats())
        out: dict[str, float] = {}
        for scope, stats in (("step", self._last), ("window", window), ("total", self.totals)):
            out.update({f"padding/{scope}/{k}": v for k, v in self._axes(stats).items()})
        return out

    def _update(self, wait: bool = True) -> None:
        """Count the pending batches (``wait=False``: only those whose lengths reached the host)."""
        for step, lengths in self._pending.drain(wait):
            stats = lengths.padding_stats(self.encoder_length)
            self.totals = self.totals + stats
            self._window.append(stats)
            self._last = stats
            self.has_tokens |= lengths.has_outputs
            self.layouts.add("packed" if lengths.packed else "padded")
            if self._shapes_path is not None and self._counted % self.shape_sample_every == 0:
                self._shape_records.append(self._shape_record(step, lengths, stats))
            self._counted += 1
        if len(self._shape_records) >= 1000:  # bounded memory even when nothing is logged
            self._write_shapes()

    def _shape_record(self, step: int, lengths: BatchLengths, stats: PaddingStats) -> dict:
        frames = lengths.input_lengths
        if lengths.durations is not None:
            seconds = max(lengths.durations, default=0.0)
        elif self.frame_shift is not None:
            seconds = max(frames, default=0) * self.frame_shift
        else:
            seconds = None
        f = stats.fractions()
        has_tokens = lengths.output_lengths is not None
        return {
            "step": step,
            "batch_size": lengths.batch_size,
            "max_frames": max(frames, default=0),
            "max_seconds": None if seconds is None else round(seconds, 3),
            "max_tokens": max(lengths.output_lengths, default=0) if has_tokens else None,
            "frames": stats.frames_real,
            "tokens": stats.tokens_real if has_tokens else None,
            "padding_frames": round(f["padding_frames"], 5),
            "padding_tokens": round(f["padding_tokens"], 5) if has_tokens else None,
            "packed": lengths.packed,
        }

    def _write_shapes(self) -> None:
        if self._shapes_path is None or not self._shape_records:
            return
        self._shapes_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._shapes_path, "a") as f:
            for record in self._shape_records:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._shape_records.clear()


class GPUUtilizationMonitor(StepLogger):
    """GPU utilization and memory, sampled in a background thread, logged every logging step.

    Logged (over the samples since the last log): ``gpu/utilization_mean`` and
    ``gpu/utilization_min`` (percent of time a kernel ran, NVML), ``gpu/memory_used_gib`` (mean)
    and ``gpu/memory_peak_gib`` (max) of the device memory in use (all processes), and torch's
    ``gpu/torch_peak_allocated_gib`` (``torch.cuda.max_memory_allocated``; never reset here, so
    other users of that counter are undisturbed). Sampling pauses during validation.

    Without a CUDA device or without NVML it warns once and does nothing.

    Args:
        interval_seconds: time between samples.
        log_every_n_steps: logging interval in training batches; default the Trainer's.
        source: zero-argument callable returning a ``GPUSample`` (tests, other telemetry); default
            NVML for the Trainer's device.
    """

    def __init__(
        self,
        interval_seconds: float = 0.5,
        *,
        log_every_n_steps: int | None = None,
        source: GPUSampleSource | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        self.interval_seconds = interval_seconds
        self.source = source
        self.window = UtilizationWindow()
        self.torch_peak_allocated = 0  # bytes
        self._sampler: GPUSampler | None = None
        self._nvml: NvmlSource | None = None
        self._device: torch.device | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = trainer.strategy.root_device
        self._device = device if device.type == "cuda" else None
        source = self.source
        if source is None:
            if self._device is None:
                self._warn_once("gpu", f"no CUDA device (training on {device.type}); disabled")
                return
            try:
                self._nvml = source = NvmlSource(self._device.index or 0)
            except Exception as e:
                self._warn_once("gpu", f"NVML unavailable ({e!r}); install nvidia-ml-py. Disabled")
                return
        self._sampler = GPUSampler(source, self.interval_seconds, self.window)
        self._sampler.start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._count_and_check(trainer) and self._sampler is not None:
            self._log(trainer, self._metrics())

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None:
            self._sampler.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None:
            self._sampler.resume()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None and self._batches > self._logged_at:
            self._log(trainer, self._metrics())
        self._shutdown()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException):
        self._shutdown()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "torch_peak_allocated": self.torch_peak_allocated,
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.torch_peak_allocated = int(state["torch_peak_allocated"])
        self._batches = self._logged_at = int(state["batches"])

    def summary(self) -> str:
        w = self.window
        if w.samples == 0:
            return "GPU: not monitored (no CUDA device or NVML)."
        text = (
            f"GPU: utilization {w.utilization_mean:.1f}% (mean of {w.samples:,} samples), "
            f"peak memory used {w.memory_peak / GIB:.2f} GiB"
        )
        if self.torch_peak_allocated:
            text += f", torch peak allocated {self.torch_peak_allocated / GIB:.2f} GiB"
        return text

    def _metrics(self) -> dict[str, float]:
        metrics = self._sampler.flush() if self._sampler is not None else {}
        if self._device is not None:
            peak = torch.cuda.max_memory_allocated(self._device)
            self.torch_peak_allocated = max(self.torch_peak_allocated, peak)
            metrics["gpu/torch_peak_allocated_gib"] = peak / GIB
        return metrics

    def _shutdown(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None


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


_COUNTERS = ("batches", "utterances", "frames", "tokens", "audio_seconds", "flops", "train_seconds")
_RATES = ("batches", "utterances", "frames", "tokens", "audio_seconds", "flops")
_OPTIONAL = ("tokens", "audio_seconds", "flops")


_OLD_NAME = "ThroughputMonitor"
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
