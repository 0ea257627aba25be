"""A training run's logs as the profiler callbacks wrote them: the metrics CSV of Lightning's
CSVLogger (the ``padding/*``, ``throughput/*`` and ``gpu/*`` columns) and the
``batch_shapes.jsonl`` that ``PaddingMonitor`` writes next to it. ``report`` summarizes them,
``plots`` draws them; both read them through here. Works on any Lightning project that used the
callbacks.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speedasr.errors import UserError

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


def padding_axes(run: RunLogs) -> list[str]:
    """The padding axes a run logged, in ``PADDING_AXES`` order (unknown names last)."""
    found = {k.split("/")[-1] for k in run.series if k.startswith("padding/")}
    order = {a: i for i, a in enumerate(PADDING_AXES)}
    return sorted(found, key=lambda a: (order.get(a, len(order)), a))


def duration_axis(shapes: list[dict[str, Any]]) -> tuple[str, list[float]]:
    """Longest utterance per batch in seconds if recorded, else in frames."""
    if all(r.get("max_seconds") is not None for r in shapes):
        return "s", [float(r["max_seconds"]) for r in shapes]
    return "frames", [float(r["max_frames"]) for r in shapes]
