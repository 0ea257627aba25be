"""PNG plots of a run's profile (matplotlib, no display needed): padding over steps, batch shape
map, throughput and GPU utilization over steps. Each function returns the file it wrote, or None
when the run logged nothing for it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (headless servers, CI)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from speedasr.profile.logs import RunLogs, Series, duration_axis, padding_axes  # noqa: E402

COLORS = {
    "frames": "tab:blue",
    "encoder_frames": "tab:cyan",
    "tokens": "tab:orange",
    "attention": "tab:red",
    "encoder_self_attention": "tab:purple",
    "decoder_self_attention": "tab:brown",
    "cross_attention": "tab:pink",
}
DPI = 110
MARGIN = 0.03
"""Batch shape map: room left on each side of the data, as a share of its range."""


def _xy(series: Series, scale: float = 1.0) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v * scale for _, v in series]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_padding(run: RunLogs, path: Path) -> Path | None:
    """Padding (%) per axis over steps: windowed lines, single-batch dots, run totals in legend."""
    axes = [
        a
        for a in padding_axes(run)
        if run.get(f"padding/window/{a}") or run.get(f"padding/step/{a}")
    ]
    if not axes:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    top = 0.0
    for a in axes:
        color, label = COLORS.get(a, "tab:gray"), a.replace("_", " ")
        steps, values = _xy(run.get(f"padding/step/{a}"), 100)
        ax.scatter(steps, values, s=6, color=color, alpha=0.25, linewidths=0)
        steps, values = _xy(run.get(f"padding/window/{a}"), 100)
        total = run.last(f"padding/total/{a}")
        if total is not None:
            label += f" (run: {100 * total:.1f}%)"
        # encoder frames often track frames closely: dashed so both stay visible
        ls = "--" if a == "encoder_frames" else "-"
        ax.plot(steps, values, color=color, lw=2, ls=ls, label=label)
        top = max([top, *values, *_xy(run.get(f"padding/step/{a}"), 100)[1]])
    ax.set_ylim(0, min(100, top * 1.1 + 2))
    ax.set_xlabel("training step")
    ax.set_ylabel("padding (% of computed positions)")
    ax.set_title("Padding per axis — lines: moving window, dots: single batches")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


def plot_batch_shapes(run: RunLogs, path: Path, bins: int = 24) -> Path | None:
    """Where batches fall in (longest utterance, longest transcript): batch counts, and mean
    utterances per batch in each cell. Without tokens, the y axis is the batch size."""
    if not run.shapes:
        return None
    unit, x = duration_axis(run.shapes)
    sizes = np.array([r["batch_size"] for r in run.shapes], dtype=float)
    has_tokens = all(r.get("max_tokens") is not None for r in run.shapes)
    x = np.array(x)
    y = np.array([r["max_tokens"] for r in run.shapes], dtype=float) if has_tokens else sizes
    x_edges, y_edges = _fitted_edges(x, bins), _fitted_edges(y, bins)
    counts, _, _ = np.histogram2d(x, y, bins=(x_edges, y_edges))
    xlabel = f"longest utterance in batch ({unit})"
    ylabel = "longest transcript in batch (tokens)" if has_tokens else "utterances per batch"
    extent = (x_edges[0], x_edges[-1], y_edges[0], y_edges[-1])

    panels = 2 if has_tokens else 1
    fig, axs = plt.subplots(1, panels, figsize=(6.2 * panels, 5), squeeze=False)
    ax = axs[0, 0]
    shown = np.ma.masked_equal(counts.T, 0)
    # log colors when a few cells hold most batches (bucketed runs); linear for small samples
    norm = LogNorm(vmin=1, vmax=counts.max()) if counts.max() > 50 else None
    im = ax.imshow(shown, origin="lower", aspect="auto", extent=extent, cmap="viridis", norm=norm)
    fig.colorbar(im, ax=ax, label="batches")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"Batch shape map ({len(sizes):,} sampled batches)")
    if has_tokens:
        total, _, _ = np.histogram2d(x, y, bins=(x_edges, y_edges), weights=sizes)
        mean = np.ma.masked_invalid(
            np.divide(total, counts, where=counts > 0, out=np.full_like(total, np.nan))
        )
        ax = axs[0, 1]
        im = ax.imshow(mean.T, origin="lower", aspect="auto", extent=extent, cmap="YlOrRd")
        fig.colorbar(im, ax=ax, label="utterances per batch (mean)")
        ax.set(xlabel=xlabel, ylabel=ylabel, title="Batch size by shape")
    for ax in axs[0]:
        ax.set_facecolor("#e4e4e4")  # empty cells: no batches
    fig.tight_layout()
    return _save(fig, path)


def _fitted_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Bin edges over the data's range plus ``MARGIN`` on each side: batches of one sampler sit
    in a narrow band (e.g. 18-30 s), which an axis from 0 squeezes into a corner."""
    lo, hi = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and hi - lo + 1 <= bins:
        # few distinct counts (batch sizes...): one cell per integer, centred on it
        return np.arange(lo - 0.5, hi + 1.0)
    span = hi - lo
    pad = MARGIN * span if span > 0 else max(abs(hi) * 0.05, 0.5)  # one value: a window around it
    return np.linspace(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad, bins + 1)


def plot_throughput(run: RunLogs, path: Path) -> Path | None:
    """Real work per second over steps: audio seconds/s, real frames and tokens/s, MFU."""
    get = run.get
    if not get("throughput/frames_per_sec"):
        return None
    panels: list[tuple[str, list[tuple[str, str, float]]]] = []
    if get("throughput/audio_seconds_per_sec"):
        panels.append(("audio seconds / s", [("throughput/audio_seconds_per_sec", "audio", 1)]))
    else:
        panels.append(("utterances / s", [("throughput/utterances_per_sec", "utterances", 1)]))
    panels.append(("real frames / s", [("throughput/frames_per_sec", "frames", 1)]))
    if get("throughput/tokens_per_sec"):
        panels.append(("real tokens / s", [("throughput/tokens_per_sec", "tokens", 1)]))
    if get("throughput/mfu"):
        panels.append(("MFU (%)", [("throughput/mfu", "MFU", 100)]))
    elif get("throughput/flops_per_sec"):
        panels.append(("TFLOP/s", [("throughput/flops_per_sec", "TFLOP/s", 1e-12)]))

    fig, axs = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels) + 0.6), sharex=True)
    axs = np.atleast_1d(axs)
    palette = iter(["tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:gray"])
    for ax, (ylabel, lines) in zip(axs, panels, strict=True):
        for key, _, scale in lines:
            steps, values = _xy(get(key), scale)
            ax.plot(steps, values, marker="o", ms=2.5, lw=1.5, color=next(palette))
            ax.axhline(float(np.median(values)), color="k", lw=0.8, ls=":", alpha=0.6)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 600k, not 600000
        ax.grid(alpha=0.3)
    axs[0].set_title("Throughput of real (non-padding) work per device — dotted: median")
    axs[-1].set_xlabel("training step")
    fig.tight_layout()
    return _save(fig, path)


def plot_gpu(run: RunLogs, path: Path) -> Path | None:
    """GPU utilization (mean and min per interval) and memory over steps."""
    get = run.get
    if not get("gpu/utilization_mean"):
        return None
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    steps, mean = _xy(get("gpu/utilization_mean"))
    ax1.plot(steps, mean, color="tab:green", lw=1.8, label="mean over interval")
    if get("gpu/utilization_min"):
        s_min, v_min = _xy(get("gpu/utilization_min"))
        ax1.fill_between(s_min, v_min, mean[: len(v_min)], color="tab:green", alpha=0.2)
        ax1.plot(s_min, v_min, color="tab:green", lw=0.8, ls="--", label="min sample")
    ax1.set(ylim=(0, 100), ylabel="GPU utilization (%)")
    ax1.set_title("GPU (rank 0): share of time a kernel is running, and memory")
    ax1.legend(loc="lower right", fontsize=9)
    for key, label, color in (
        ("gpu/memory_peak_gib", "used, peak (NVML)", "tab:red"),
        ("gpu/memory_used_gib", "used, mean (NVML)", "tab:orange"),
        ("gpu/torch_peak_allocated_gib", "torch peak allocated", "tab:blue"),
    ):
        if get(key):
            ax2.plot(*_xy(get(key)), label=label, color=color, lw=1.5)
    ax2.set(ylabel="memory (GiB)", xlabel="training step")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="lower right", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_all(run: RunLogs, out: Path) -> list[Path]:
    """Every plot the run has data for, written into ``out``."""
    written = [
        plot_padding(run, out / "padding.png"),
        plot_batch_shapes(run, out / "batch_shapes.png"),
        plot_throughput(run, out / "throughput.png"),
        plot_gpu(run, out / "gpu.png"),
    ]
    return [p for p in written if p is not None]
