"""Progress output into a log file redraws rarely; on a terminal as usual."""

import io

import pytest
from pytorch_lightning.callbacks import ProgressBar

from speedasr import console
from speedasr.config import TrainConfig
from speedasr.train.builder import build_callbacks
from speedasr.train.progress import LogProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_into_a_log_file_redraw_every_30_seconds():
    bar = console.progress_bar(range(3), file=io.StringIO())
    assert bar.mininterval == console.LOG_INTERVAL
    bar = console.progress_bar(range(3), file=Terminal())
    assert bar.mininterval == 0.1  # tqdm's default
    bar = console.progress_bar(range(3), file=io.StringIO(), mininterval=1.0)
    assert bar.mininterval == 1.0  # an explicit choice wins


@pytest.mark.parametrize("terminal", [True, False])
def test_training_progress_into_a_log_file_is_a_line_every_100_steps(
    monkeypatch, tmp_path, terminal
):
    monkeypatch.setattr(console, "is_terminal", lambda stream=None: terminal)
    callbacks, _ = build_callbacks(TrainConfig(), tmp_path)
    bars = [c for c in callbacks if isinstance(c, ProgressBar)]
    if terminal:
        assert bars == []  # Lightning's own bar, refreshed every step
    else:  # plain lines (tests/train/test_log_progress.py)
        assert [type(b) for b in bars] == [LogProgressBar]
        assert bars[0].every_n_steps == console.LOG_REFRESH_STEPS
