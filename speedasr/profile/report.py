"""`speedasr profile`: a text summary and PNG plots from a training run's logs.

Reads the logs through ``speedasr.profile.logs`` (the metrics CSV written by Lightning's CSVLogger
and the ``batch_shapes.jsonl`` of ``PaddingMonitor``); ``speedasr.profile.plots`` draws them.
Works on any Lightning project that used the callbacks.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from speedasr.errors import UserError
from speedasr.extras import require
from speedasr.profile.logs import (
    SHAPES_FILE,
    RunLogs,
    duration_axis,
    find_metrics,
    load_run,
    padding_axes,
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


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
