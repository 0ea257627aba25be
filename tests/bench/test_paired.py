import pytest

from speedasr.bench.paired import median_paired_ratio, run_interleaved


def test_run_interleaved_calls_a_b_c_once_per_repeat():
    calls = []

    def timer(name):
        def run_pass():
            calls.append(name)
            return len(calls)

        return run_pass

    results = run_interleaved({"a": timer("a"), "b": timer("b"), "c": timer("c")}, repeats=3)
    assert calls == ["a", "b", "c"] * 3
    assert results == {"a": [1, 4, 7], "b": [2, 5, 8], "c": [3, 6, 9]}


def test_median_paired_ratio_pairs_by_repeat():
    # Per-repeat ratios 30/10, 50/40, 60/20 = 3, 1.25, 3 -> median 3; the ratio of the medians
    # (50 / 20 = 2.5) would be another number.
    assert median_paired_ratio([30, 50, 60], [10, 40, 20]) == 3.0
    assert median_paired_ratio([1, 3], [2, 2]) == 1.0  # even count: mean of the middle two


@pytest.mark.parametrize(("a", "b"), [([], []), ([1.0, 2.0], [1.0])])
def test_median_paired_ratio_needs_equal_nonempty_repeats(a, b):
    with pytest.raises(ValueError, match="equally many repeats"):
        median_paired_ratio(a, b)
