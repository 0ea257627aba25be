"""Results of ``speedasr bench convergence``: time to target, paired ratios, the markdown table and
the PNG of the dev-WER curves. Works on finished runs (``convergence.RunResult`` or anything with
its fields); trains nothing."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speedasr.errors import UserError

if TYPE_CHECKING:
    from speedasr.bench.convergence import RunResult

LABELS = {
    "random": "padded-random (lhotse DynamicCutSampler)",
    "bucket2d": "padded-2D (speedasr 2D buckets)",
    "packed": "packed (speedasr)",
}


def time_to_target(points: list[dict[str, float]], metric: str, target: float):
    """The first point whose ``metric`` is at or below ``target``, or None."""
    for p in points:
        if p[metric] <= target:
            keys = ("train_seconds", "elapsed_seconds", "step", "audio_hours")
            return {k: p[k] for k in keys}
    return None


def summarize(results: list[RunResult], strategies) -> dict[str, Any]:
    """Per strategy medians over repeats, and packed's time-to-target ratios: the median of
    per-repeat ratios. Where a padded run missed the target, its ratio is only bounded above by
    packed's time / that run's whole training time: the median with those bounds is reported as
    ``*_at_most``. Repeats where packed missed the target give no ratio."""
    summary: dict[str, Any] = {}
    for s in strategies:
        runs = [r for r in results if r.strategy == s]
        reached = [r.time_to_target for r in runs if r.time_to_target]
        summary[s] = {
            "repeats": len(runs),
            "reached": len(reached),
            "time_to_target_seconds": statistics.median(t["train_seconds"] for t in reached)
            if len(reached) == len(runs)
            else None,
            "steps_to_target": statistics.median(t["step"] for t in reached)
            if len(reached) == len(runs)
            else None,
            "audio_hours_to_target": statistics.median(t["audio_hours"] for t in reached)
            if len(reached) == len(runs)
            else None,
            "train_seconds": statistics.median(r.train_seconds for r in runs),
            "seconds_per_step": statistics.median(r.train_seconds / max(1, r.steps) for r in runs),
            "final_wer": statistics.median(r.points[-1]["wer"] for r in runs if r.points),
            "final_ctc_wer": statistics.median(r.points[-1]["ctc_wer"] for r in runs if r.points),
            "padding_frames": statistics.median(r.padding["padding_frames"] for r in runs),
            "padding_tokens": statistics.median(r.padding["padding_tokens"] for r in runs),
            "mean_real_seconds_per_batch": statistics.median(
                r.mean_real_seconds_per_batch for r in runs
            ),
            "max_batch_seconds": max(r.max_batch_seconds for r in runs),
        }
    ratios: dict[str, float | None] = {}
    if "packed" in strategies:
        packed = {r.repeat: r for r in results if r.strategy == "packed"}
        for other in (s for s in strategies if s != "packed"):
            exact, bounds = [], []
            for r in (r for r in results if r.strategy == other):
                p = packed[r.repeat].time_to_target
                if p is None:
                    continue
                if r.time_to_target:
                    exact.append(p["train_seconds"] / r.time_to_target["train_seconds"])
                else:
                    bounds.append(p["train_seconds"] / r.train_seconds)
            n = len(packed)
            ratios[f"packed_over_{other}"] = statistics.median(exact) if len(exact) == n else None
            # Each missed repeat's ratio is below its bound; the median is monotone in each.
            ratios[f"packed_over_{other}_at_most"] = (
                statistics.median(exact + bounds) if bounds and len(exact + bounds) == n else None
            )
    return {"strategies": summary, "ratios": ratios}


def markdown_table(summary: dict[str, Any], metric: str, target: float) -> str:
    """The results as a markdown table (one row per strategy)."""

    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.0f}"):
        return "not reached" if x is None else fmt.format(x)

    ratios = summary["ratios"]

    def ratio(strategy: str, other: str) -> str:
        if strategy != "packed":
            return "1.00" if strategy == other else ""
        exact = ratios.get(f"packed_over_{other}")
        bound = ratios.get(f"packed_over_{other}_at_most")
        return f"{exact:.2f}" if exact is not None else (f"≤ {bound:.2f}" if bound else "—")

    head = (
        f"| strategy | train s to {metric} WER ≤ {100 * target:.0f}% | steps | audio h | "
        "packed / random | packed / 2D | final WER att / CTC | s/step | padding frames / tokens "
        "| real s per batch | max batch s |"
    )
    lines = [head, "|" + "---|" * 11]
    for s, v in summary["strategies"].items():
        lines.append(
            f"| {LABELS[s]} | {num(v['time_to_target_seconds'])} | "
            f"{num(v['steps_to_target'])} | {num(v['audio_hours_to_target'], '{:.2f}')} | "
            f"{ratio(s, 'random')} | {ratio(s, 'bucket2d')} | "
            f"{pct(v['final_wer'])} / {pct(v['final_ctc_wer'])} | {v['seconds_per_step']:.2f} | "
            f"{pct(v['padding_frames'])} / {pct(v['padding_tokens'])} | "
            f"{v['mean_real_seconds_per_batch']:.1f} | {v['max_batch_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(results: list[RunResult], metric: str, target: float, path: Path) -> None:
    """Dev WER (attention solid, CTC dashed) against training seconds, steps and audio hours."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "plotting needs matplotlib: pip install 'speedasr[plots]' (or pass --no-plot)"
        ) from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    colors = {"random": "tab:red", "bucket2d": "tab:orange", "packed": "tab:blue"}
    axes_x = [
        ("train_seconds", "training wall seconds (validation excluded)"),
        ("step", "optimizer steps"),
        ("audio_hours", "hours of audio seen"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, (key, label) in zip(axes, axes_x, strict=True):
        for r in results:
            x = [p[key] for p in r.points]
            name = r.strategy if r.repeat == 0 else None
            c = colors.get(r.strategy)
            ax.plot(x, [100 * p["wer"] for p in r.points], "-o", ms=3, color=c, label=name)
            ax.plot(x, [100 * p["ctc_wer"] for p in r.points], "--", color=c, alpha=0.7)
        ax.axhline(100 * target, color="gray", lw=0.8, ls=":")
        # An untrained decoder loops (WER far above 100%): the curves' interesting part is below.
        ax.set_ylim(0, 105)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev WER % (attention solid, CTC dashed; axis ends at 105)")
    axes[0].legend(title=f"target: {metric} ≤ {100 * target:.0f}%")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
