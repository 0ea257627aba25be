"""``PaddingMonitor``: the fraction of computed frames, tokens and attention scores that is padding,
logged per step, over a window and over the run (``speedasr.train.callbacks`` exports it)."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningModule, Trainer

from speedasr.core.geometry import encoder_length
from speedasr.data.padding import PaddingStats
from speedasr.profile.batch_lengths import BatchLengths, PendingLengths, default_batch_lengths
from speedasr.profile.logs import SHAPES_FILE
from speedasr.profile.step_logger import BatchLengthsFn, StepLogger, log_dir

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
