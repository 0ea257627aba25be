"""Progress output into a log file redraws rarely; on a terminal as usual."""

import io

import pytest
from pytorch_lightning.callbacks import TQDMProgressBar

from speedasr import console
from speedasr.config import TrainConfig
from speedasr.train.builder import build_callbacks


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
def test_training_bar_refreshes_every_100_steps_into_a_log_file(monkeypatch, tmp_path, terminal):
    monkeypatch.setattr(console, "is_terminal", lambda stream=None: terminal)
    callbacks, _ = build_callbacks(TrainConfig(), tmp_path)
    bars = [c for c in callbacks if isinstance(c, TQDMProgressBar)]
    if terminal:
        assert bars == []  # Lightning's own bar, refreshed every step
    else:
        assert [b.refresh_rate for b in bars] == [console.LOG_REFRESH_STEPS]
