"""Sampling constraints over 2D bins: what a batch of one (duration, tokens) bucket may hold.

``Bucketed2DConstraint`` is the common part (the bucket of a cut, the per-bucket TPS filter, the
state a sampler saves); ``Bucket2DConstraint`` fills padded batches to a padded-size budget or to
per-bucket batch sizes. The packed constraint is ``speedasr.data.packing.PackingConstraint``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lhotse.cut import Cut
from lhotse.dataset.sampling.base import SamplingConstraint

from speedasr.data.bucketing import BucketBins, TokenCounter, basic_reject_reason


class Bucketed2DConstraint(SamplingConstraint):
    """Base of the 2D constraints: measures cuts, assigns buckets, says why a cut is rejected.

    ``select_bucket`` ignores lhotse's duration bins (pass ``duration_bins`` of length
    ``bins.num_buckets - 1`` so lhotse makes the right number of queues) and returns the 2D bucket.
    Measurements ``(d, L, bucket)`` are cached by cut id and shared by the copies lhotse makes.
    """

    def __init__(self, bins: BucketBins, counter: TokenCounter, strict: bool = True) -> None:
        self.bins = bins
        self.counter = counter
        self.strict = strict
        self._memo: dict[str, tuple[float, int, int | str]] = {}
        self.bucket: int | None = None
        self.num_cuts = 0

    def measure(self, cut: Cut) -> tuple[float, int, int | str]:
        """``(seconds, decoder tokens, bucket index or reject reason)``."""
        m = self._memo.get(cut.id)
        if m is None:
            d, n = float(cut.duration), self.counter(cut)
            m = (d, n, self.bins.assign(d, n, self.strict))
            if len(self._memo) >= (self.counter.cache_size or 1 << 62):
                del self._memo[next(iter(self._memo))]
            self._memo[cut.id] = m
        return m

    def reject_reason(self, cut: Cut) -> str | None:
        """Why this constraint can never put ``cut`` in a batch, or ``None``."""
        reason = basic_reject_reason(cut, self.counter)
        if reason is not None:
            return reason
        d, n, bucket = self.measure(cut)
        if isinstance(bucket, str):
            return bucket
        if not self.fits_alone(d, n, bucket):
            return "over_budget"
        return None

    def fits_alone(self, duration: float, tokens: int, bucket: int) -> bool:
        raise NotImplementedError

    def select_bucket(self, buckets: Any, example: Any = None, example_len: Any = None) -> int:
        bucket = self.measure(example)[2]
        if isinstance(bucket, str):
            raise ValueError(f"cut {example.id} was not filtered out ({bucket}); use reject_reason")
        return bucket

    def measure_length(self, example: Cut) -> float:
        return example.duration

    def config(self) -> dict[str, Any]:
        """Everything that decides batches (saved in sampler state for exact resume)."""
        return {
            "type": type(self).__name__,
            "bins": self.bins.to_dict(),
            "strict": self.strict,
            "tokens": self.counter.name,
        }

    def copy(self) -> Bucketed2DConstraint:
        c = super().copy()
        c.reset()
        return c


class Bucket2DConstraint(Bucketed2DConstraint):
    """Padded batches from one 2D bucket, budgeted by padded size or by per-bucket batch sizes.

    Padded size follows lhotse's ``TimeConstraint``: ``B × longest`` seconds (longest including
    the ``d²/quadratic_duration`` term), at most ``max_duration``; optionally also ``B × longest``
    tokens at most ``max_tokens``. With ``batch_sizes`` (one per bucket, e.g. from ``speedasr
    calibrate``), bucket ``k`` batches exactly ``batch_sizes[k]`` cuts.
    """

    def __init__(
        self,
        bins: BucketBins,
        counter: TokenCounter,
        strict: bool = True,
        max_duration: float | None = None,
        max_tokens: int | None = None,
        quadratic_duration: float | None = None,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(bins, counter, strict)
        if (max_duration is None) == (batch_sizes is None):
            raise ValueError("give exactly one budget: max_duration or batch_sizes")
        if batch_sizes is not None:
            if len(batch_sizes) != bins.num_buckets or min(batch_sizes) < 1:
                raise ValueError(
                    f"batch_sizes needs {bins.num_buckets} positive sizes (one per bucket), "
                    f"got {len(batch_sizes)}"
                )
        for name, v in (
            ("max_duration", max_duration),
            ("max_tokens", max_tokens),
            ("quadratic_duration", quadratic_duration),
        ):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.max_duration = max_duration
        self.max_tokens = max_tokens
        self.quadratic_duration = quadratic_duration
        self.batch_sizes = list(batch_sizes) if batch_sizes is not None else None
        self.reset()

    def _seconds(self, d: float) -> float:
        q = self.quadratic_duration
        return d if q is None else d + d * d / q

    def reset(self) -> None:
        self.bucket, self.num_cuts, self.longest_s, self.longest_t = None, 0, 0.0, 0

    def add(self, example: Cut) -> None:
        d, n, bucket = self.measure(example)
        if self.bucket is None:
            self.bucket = bucket
        self.num_cuts += 1
        self.longest_s = max(self.longest_s, self._seconds(d))
        self.longest_t = max(self.longest_t, n)

    def corner(self, bucket: int) -> tuple[float, int]:
        """Padded seconds and tokens of the largest cut bucket ``bucket`` can hold."""
        d, t = self.bins.bucket_shape(bucket)
        return self._seconds(d), t

    def try_add(self, example: Cut) -> bool:
        """Add ``example`` if the padded batch stays within budget; return whether it was added.
        (lhotse's batchers use ``add``, which may overshoot by one cut, like ``TimeConstraint``.)"""
        d, n, bucket = self.measure(example)
        s, t = max(self.longest_s, self._seconds(d)), max(self.longest_t, n)
        if self._over(self.num_cuts + 1, s, t, self.bucket if self.bucket is not None else bucket):
            return False
        if self.bucket is None:
            self.bucket = bucket
        self.num_cuts += 1
        self.longest_s, self.longest_t = s, t
        return True

    def _over(self, b: int, longest_s=None, longest_t=None, bucket=None) -> bool:
        if self.batch_sizes is not None:
            bucket = self.bucket if bucket is None else bucket
            return bucket is not None and b > self.batch_sizes[bucket]
        s = self.longest_s if longest_s is None else longest_s
        t = self.longest_t if longest_t is None else longest_t
        if self.max_duration is not None and b * s > self.max_duration * (1 + 1e-12):
            return True
        return self.max_tokens is not None and b * t > self.max_tokens

    def exceeded(self) -> bool:
        return self._over(self.num_cuts)

    def close_to_exceeding(self) -> bool:
        return self._over(self.num_cuts + 1)

    def fits_alone(self, duration: float, tokens: int, bucket: int) -> bool:
        if self.batch_sizes is not None:
            return True
        ok = self.max_duration is None or self._seconds(duration) <= self.max_duration
        return ok and (self.max_tokens is None or tokens <= self.max_tokens)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "max_duration": self.max_duration,
            "max_tokens": self.max_tokens,
            "quadratic_duration": self.quadratic_duration,
            "batch_sizes": self.batch_sizes,
        }
