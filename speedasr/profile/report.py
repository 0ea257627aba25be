"""`speedasr profile`: a text summary and PNG plots from a training run's logs.

Reads the metrics CSV written by Lightning's CSVLogger (the profiler callbacks' ``padding/*``,
``throughput/*`` and ``gpu/*`` columns) and the ``batch_shapes.jsonl`` that ``PaddingMonitor``
writes next to it. Works on any Lightning project that used the callbacks.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speedasr.errors import UserError
from speedasr.extras import require

METRICS_FILE = "metrics.csv"
SHAPES_FILE = "batch_shapes.jsonl"
"""Where ``speedasr.train.callbacks.PaddingMonitor`` samples batch shapes, next to the metrics."""
PREFIXES = ("padding/", "throughput/", "gpu/")
PADDING_AXES = (
    "frames", "encoder_frames", "tokens", "attention",
    "encoder_self_attention", "decoder_self_attention", "cross_attention",
)  # fmt: skip
"""Display order of PaddingMonitor's axes (a run logs those its model has); others follow."""

Series = list[tuple[int, float]]
"""(step, value) pairs, sorted by step."""


@dataclass
class RunLogs:
    """What a training run logged: metric series and batch shape samples."""

    metrics_path: Path
    series: dict[str, Series] = field(default_factory=dict)
    shapes: list[dict[str, Any]] = field(default_factory=list)
    shapes_path: Path | None = None

    def get(self, name: str) -> Series:
        return self.series.get(name, [])

    def last(self, name: str) -> float | None:
        s = self.get(name)
        return s[-1][1] if s else None

    def median(self, name: str) -> float | None:
        s = self.get(name)
        return statistics.median(v for _, v in s) if s else None


def find_metrics(log_dir: Path) -> Path:
    """The metrics CSV of a log directory: ``DIR/metrics.csv`` or the newest one below DIR."""
    if not log_dir.exists():
        raise UserError(f"log directory '{log_dir}' does not exist")
    if log_dir.is_file():
        return log_dir
    direct = log_dir / METRICS_FILE
    if direct.is_file():
        return direct
    found = sorted(log_dir.rglob(METRICS_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"no {METRICS_FILE} under '{log_dir}': train with Lightning's CSVLogger (speedasr's "
            "default) or pass --metrics FILE"
        )
    return found[-1]


def load_metrics(path: Path) -> dict[str, Series]:
    """Profiler metric series from a Lightning CSV (sparse rows: one per logger call)."""
    if not path.is_file():
        raise UserError(f"metrics file '{path}' does not exist")
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise UserError(f"'{path}' is not a Lightning metrics CSV (no 'step' column)")
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                continue
            for key, value in row.items():
                if key and key.startswith(PREFIXES) and value not in (None, ""):
                    series.setdefault(key, {})[step] = float(value)
    if not series:
        raise UserError(
            f"'{path}' has no padding/, throughput/ or gpu/ metrics: add PaddingMonitor, "
            "SpeechThroughputMonitor and GPUUtilizationMonitor (speedasr.train.callbacks) to the "
            "Trainer"
        )
    return {k: sorted(v.items()) for k, v in series.items()}


def load_shapes(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"'{path}' line {number} is not JSON: {e}") from None
    return records


def load_run(metrics_path: Path, shapes_path: Path | None = None) -> RunLogs:
    shapes_path = shapes_path or metrics_path.parent / SHAPES_FILE
    has_shapes = shapes_path.is_file()
    return RunLogs(
        metrics_path=metrics_path,
        series=load_metrics(metrics_path),
        shapes=load_shapes(shapes_path) if has_shapes else [],
        shapes_path=shapes_path if has_shapes else None,
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def padding_axes(run: RunLogs) -> list[str]:
    """The padding axes a run logged, in ``PADDING_AXES`` order (unknown names last)."""
    found = {k.split("/")[-1] for k in run.series if k.startswith("padding/")}
    order = {a: i for i, a in enumerate(PADDING_AXES)}
    return sorted(found, key=lambda a: (order.get(a, len(order)), a))


def intervals_text(steps: list[int]) -> str:
    """``"12 logging intervals of 10 steps"`` from the steps the intervals were logged at."""
    spans = [b - a for a, b in zip([0, *steps], steps, strict=False)]
    common = max(set(spans), key=spans.count)
    irregular = [n for n in spans[1:-1] if n != common]  # first/last may be partial
    size = f"{min(spans)}-{max(spans)}" if irregular else f"{common}"
    plural = "s" if len(spans) != 1 else ""
    return f"{len(spans)} logging interval{plural} of {size} steps"


def summarize(run: RunLogs) -> str:
    """Plain-text summary of a run (what ``speedasr profile`` prints)."""
    steps = sorted({s for series in run.series.values() for s, _ in series})
    lines = [f"Profile of {run.metrics_path} (logged steps {steps[0]}-{steps[-1]})", ""]

    axes = [
        a
        for a in padding_axes(run)
        if run.get(f"padding/total/{a}") or run.get(f"padding/window/{a}")
    ]
    if axes:
        lines.append("Padding (share of computed positions that is padding):")
        width = max(15, *(len(a) + 1 for a in axes))
        for a in axes:
            total, window = run.last(f"padding/total/{a}"), run.last(f"padding/window/{a}")
            name = a.replace("_", " ")
            lines.append(
                f"  {name:<{width}} whole run {_pct(total):>6}   last window {_pct(window):>6}"
            )
        if "tokens" not in axes and "attention" in axes:
            # the default axes without outputs; a model that names its own axes and leaves tokens
            # out (axes=...) has no tokens to call absent
            lines.append("  tokens          absent (batches have no output sequence)")
        lines.append("")

    if run.shapes:
        sizes = [r["batch_size"] for r in run.shapes]
        unit, values = duration_axis(run.shapes)
        lines.append(
            f"Batch shapes ({len(sizes):,} sampled batches): {statistics.mean(sizes):.1f} "
            f"utterances per batch (min {min(sizes)}, max {max(sizes)}); longest utterance "
            f"per batch {min(values):g}-{max(values):g} {unit}"
        )
        lines.append("")

    if any(k.startswith("throughput/") for k in run.series):
        r = {k: run.median(f"throughput/{k}") for k in _THROUGHPUT_KEYS}
        # every interval logs train_seconds, whatever else it knows
        logged = run.get("throughput/train_seconds") or run.get("throughput/batches_per_sec")
        parts = [
            f"{_num(r['utterances_per_sec'], ',.1f')} utterances/s",
            f"{_num(r['frames_per_sec'])} real frames/s",
        ]
        if r["tokens_per_sec"] is not None:
            parts.append(f"{_num(r['tokens_per_sec'])} real tokens/s")
        if r["audio_seconds_per_sec"] is not None:
            parts.append(f"{_num(r['audio_seconds_per_sec'], ',.1f')} audio s/s")
        if r["flops_per_sec"] is not None:
            parts.append(f"{r['flops_per_sec'] / 1e12:.3g} TFLOP/s")
        if r["mfu"] is not None:
            parts.append(f"MFU {_pct(r['mfu'])}")
        seconds = run.last("throughput/train_seconds")
        lines.append(
            "Throughput per device, median of "
            + (intervals_text([s for s, _ in logged]) if logged else "logging intervals")
            + (f" ({seconds:.1f} s of training)" if seconds is not None else "")
            + ":"
        )
        lines.append("  " + ", ".join(parts))
        lines.append(
            "  (SpeechThroughputMonitor.summary() gives whole-run rates instead: run totals / "
            "training time, each interval weighed by its duration)"
        )
        lines.append("")

    if run.get("gpu/utilization_mean"):
        means = [v for _, v in run.get("gpu/utilization_mean")]
        lowest = min(v for _, v in run.get("gpu/utilization_min"))
        peak = max((v for _, v in run.get("gpu/memory_peak_gib")), default=None)
        torch_peak = run.last("gpu/torch_peak_allocated_gib")
        text = (
            f"GPU (rank 0): utilization {statistics.mean(means):.1f}% mean over intervals "
            f"(lowest interval mean {min(means):.1f}%, lowest sample {lowest:.0f}%); "
            f"memory used peak {_num(peak, '.2f')} GiB"
        )
        if torch_peak is not None:
            text += f"; torch peak allocated {torch_peak:.2f} GiB"
        lines.append(text)
    else:
        lines.append("GPU: not monitored (no GPU, no NVML, or no GPUUtilizationMonitor).")
    return "\n".join(lines)


_THROUGHPUT_KEYS = (
    "batches_per_sec", "utterances_per_sec", "frames_per_sec", "tokens_per_sec",
    "audio_seconds_per_sec", "flops_per_sec", "mfu",
)  # fmt: skip


def duration_axis(shapes: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """Longest utterance per batch in seconds if recorded, else in frames."""
    if all(r.get("max_seconds") is not None for r in shapes):
        return "s", [float(r["max_seconds"]) for r in shapes]
    return "frames", [float(r["max_frames"]) for r in shapes]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--log-dir",
        type=Path,
        help="Lightning log directory (its metrics.csv, or the newest one below it)",
    )
    source.add_argument("--metrics", type=Path, help="a Lightning CSVLogger metrics.csv")
    parser.add_argument(
        "--shapes",
        type=Path,
        help=f"batch shape samples (default: {SHAPES_FILE} next to the metrics file)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write summary.txt and the PNGs (default: METRICS_DIR/profile)",
    )


def run(args: argparse.Namespace) -> int:
    require("matplotlib", "plotting the profile")  # before any work
    metrics_path = find_metrics(args.log_dir) if args.log_dir else args.metrics
    if args.shapes is not None and not args.shapes.is_file():
        raise UserError(f"batch shapes file '{args.shapes}' does not exist")
    logs = load_run(metrics_path, args.shapes)
    out = args.out or metrics_path.parent / "profile"
    out.mkdir(parents=True, exist_ok=True)

    from speedasr.profile.plots import plot_all  # matplotlib: only when plotting

    paths = plot_all(logs, out)
    text = summarize(logs)
    text += "\n\nPlots:\n" + "\n".join(f"  {p}" for p in paths)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0
