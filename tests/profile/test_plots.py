"""The profile's plots, read back from the matplotlib figures they draw."""

from pathlib import Path

import pytest

from speedasr.profile import plots
from speedasr.profile.logs import RunLogs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def shape(seconds: float, tokens: int | None, batch_size: int) -> dict:
    """One batch_shapes.jsonl record, as PaddingMonitor writes it."""
    return {"max_seconds": seconds, "max_frames": int(seconds * 100), "max_tokens": tokens,
            "batch_size": batch_size}  # fmt: skip


def drawn_figure(monkeypatch, run: RunLogs, tmp_path: Path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    assert plots.plot_batch_shapes(run, tmp_path / "batch_shapes.png") is not None
    (figure,) = figures
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]


def assert_fits(limits: tuple[float, float], lo: float, hi: float) -> None:
    """The axis shows [lo, hi] with a margin of at most 10% of the range on each side."""
    margin = 0.1 * (hi - lo)
    assert lo - margin <= limits[0] < lo and hi < limits[1] <= hi + margin, (limits, lo, hi)


def test_batch_shape_map_axes_fit_the_data(monkeypatch, tmp_path):
    # a bucketed run: longest utterances 18-30 s, longest transcripts 60-140 tokens
    records = [shape(18.0 + 0.5 * i, 60 + 3 * i, 8 + i % 5) for i in range(25)]
    run = RunLogs(metrics_path=tmp_path / "metrics.csv", shapes=records)
    axes = drawn_figure(monkeypatch, run, tmp_path)
    assert len(axes) == 2  # batch counts, batch size by shape
    for ax in axes:
        assert_fits(ax.get_xlim(), 18.0, 30.0)
        assert_fits(ax.get_ylim(), 60, 132)


def test_batch_shape_map_without_tokens_shows_batch_sizes(monkeypatch, tmp_path):
    records = [shape(5.0 + i, None, 3 + i % 5) for i in range(10)]  # sizes 3-7
    run = RunLogs(metrics_path=tmp_path / "metrics.csv", shapes=records)
    (ax,) = drawn_figure(monkeypatch, run, tmp_path)
    assert_fits(ax.get_xlim(), 5.0, 14.0)
    assert ax.get_ylim() == (2.5, 7.5)  # one row per batch size
