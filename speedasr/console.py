"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws in place several times a second. In a log file (a batch job, ``make
demo | tee log``) every redraw is appended, and a long run writes megabytes of bar fragments;
there the bars redraw at most every ``LOG_INTERVAL`` seconds (and at the end).
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL = 30.0
"""Seconds between progress-bar updates when the output is not a terminal."""
LOG_REFRESH_STEPS = 100
"""Training steps between Lightning progress-bar updates when the output is not a terminal."""


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable=None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr, redrawn every ``LOG_INTERVAL`` s into a log file."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    if not is_terminal(kwargs["file"]):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)
