"""Interleaved repeats and paired ratios: how the side-by-side benchmarks compare configurations on
a machine whose load changes while they run.

Timing all of A's repeats, then all of B's, lets a stretch of load from other jobs hit one
configuration only. Interleaved repeats (A B C A B C ...) time every configuration close together
within each repeat, so the ratio of two configurations within one repeat cancels slow drifts of the
load, and the median over repeats discards a burst that hit one repeat.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")


def run_interleaved(
    passes: Mapping[Key, Callable[[], Result]], repeats: int
) -> dict[Key, list[Result]]:
    """Call each of ``passes`` once per repeat, in the mapping's order within every repeat
    (A B C A B C ...); return each one's results in repeat order."""
    results: dict[Key, list[Result]] = {key: [] for key in passes}
    for _ in range(repeats):
        for key, run_pass in passes.items():
            results[key].append(run_pass())
    return results


def median_paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over repeats ``i`` of ``numerators[i] / denominators[i]``: two configurations'
    measurements from the same interleaved repeats (``run_interleaved``)."""
    if not numerators or len(numerators) != len(denominators):
        raise ValueError(
            f"paired ratios need equally many repeats (>= 1), got {len(numerators)} "
            f"and {len(denominators)}"
        )
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))
