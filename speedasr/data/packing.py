"""Packing constraint: fill a batch up to a cost budget measured on real content.

A packed batch (``PackedBatch``) concatenates utterances, so it computes exactly their frames and
tokens: nothing is padded, and the budget is spent on real content. The cost of one utterance of
``d`` seconds and ``L`` decoder tokens has two parts, each with an optional quadratic term for the
attention score matrices (which packed attention computes per utterance, so they grow with
``Σ Tᵢ²``, not ``(Σ Tᵢ)²``):

* audio seconds: ``d + d²/quadratic_duration + d·L/quadratic_cross`` (encoder self-attention
  ``Σ Tᵢ²``, cross-attention ``Σ Lᵢ·Tᵢ``), summed at most ``max_duration``;
* tokens: ``L + L²/quadratic_tokens`` (decoder self-attention ``Σ Lᵢ²``), summed at most
  ``max_tokens`` (optional).

A quadratic term doubles the cost of an utterance when its length equals the term's constant, as
lhotse's ``quadratic_duration``. With none set, ``max_duration`` is the real audio per batch.

Packed mode still draws each batch from one 2D bucket, so memory per batch is predictable and
kernels see similar shapes. With lhotse's batchers a batch is complete when one more cut of its
bucket's largest shape might not fit; the speedasr sampler (``speedasr.data.sampling``) then tries
a few more of the bucket's actual cuts with ``try_add``, and tops a batch up from neighbouring
buckets when its own runs out (end of epoch): mixing buckets never pads. The budget is never
exceeded either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lhotse.cut import Cut

from speedasr.data.bucketing import (
    BucketBins,
    TokenCounter,
    basic_reject_reason,
)
from speedasr.data.constraints import Bucketed2DConstraint


@dataclass(frozen=True)
class PackingCost:
    """Cost model and budget of a packed batch (see the module docstring)."""

    max_duration: float
    """Budget of audio cost per batch, in seconds (real audio when no quadratic term is set)."""
    max_tokens: int | None = None
    """Budget of decoder-token cost per batch (prompt + text tokens); None: no token budget."""
    quadratic_duration: float | None = None
    """Seconds; adds ``d²/q`` to an utterance's audio cost (encoder self-attention)."""
    quadratic_cross: float | None = None
    """Tokens; adds ``d·L/q`` seconds to an utterance's audio cost (cross-attention)."""
    quadratic_tokens: float | None = None
    """Tokens; adds ``L²/q`` to an utterance's token cost (decoder self-attention)."""

    def __post_init__(self) -> None:
        for name, v in asdict(self).items():
            if v is not None and not v > 0:
                raise ValueError(f"PackingCost.{name} must be > 0, got {v}")

    def audio(self, duration: float, tokens: int) -> float:
        c = duration
        if self.quadratic_duration is not None:
            c += duration * duration / self.quadratic_duration
        if self.quadratic_cross is not None:
            c += duration * tokens / self.quadratic_cross
        return c

    def tokens(self, tokens: int) -> float:
        if self.quadratic_tokens is None:
            return float(tokens)
        return tokens + tokens * tokens / self.quadratic_tokens


class PackingConstraint(Bucketed2DConstraint):
    """lhotse ``SamplingConstraint`` for packed batches: Σ cost ≤ budget on real content.

    ``close_to_exceeding`` is True once a cut of the current bucket's upper shape would not fit,
    which guarantees ``exceeded()`` never becomes True with lhotse's batchers. ``can_add(cut)`` is
    the exact test, used by the speedasr sampler to keep filling a batch with cuts that still fit.
    """

    def __init__(
        self, bins: BucketBins, counter: TokenCounter, cost: PackingCost, strict: bool = True
    ) -> None:
        super().__init__(bins, counter, strict)
        self.cost = cost
        # Cost of the largest cut each bucket can hold: the reserve kept while filling.
        self._worst = [(cost.audio(d, t), cost.tokens(t)) for d, t in bins.shapes()]
        self._costs: dict[str, tuple[float, float, int | str]] = {}
        self.reset()

    def reset(self) -> None:
        self.bucket, self.num_cuts, self.audio_cost, self.token_cost = None, 0, 0.0, 0.0

    def costs(self, example: Cut) -> tuple[float, float, int | str]:
        """``(audio cost, token cost, bucket)`` of a cut, cached by id like ``measure``."""
        e = self._costs.get(example.id)
        if e is None:
            d, n, bucket = self.measure(example)
            e = (self.cost.audio(d, n), self.cost.tokens(n), bucket)
            if len(self._costs) >= (self.counter.cache_size or 1 << 62):
                del self._costs[next(iter(self._costs))]
            self._costs[example.id] = e
        return e

    def add(self, example: Cut) -> None:
        audio, tokens, bucket = self.costs(example)
        if self.bucket is None:
            self.bucket = bucket
        self.num_cuts += 1
        self.audio_cost += audio
        self.token_cost += tokens

    def _fits(self, audio: float, tokens: float) -> bool:
        if self.audio_cost + audio > self.cost.max_duration * (1 + 1e-12):
            return False
        mt = self.cost.max_tokens
        return mt is None or self.token_cost + tokens <= mt

    def can_add(self, example: Cut) -> bool:
        """Would the batch stay within budget with ``example`` added?"""
        audio, tokens, _ = self.costs(example)
        return self._fits(audio, tokens)

    def try_add(self, example: Cut) -> bool:
        """Add ``example`` if it fits the budget; return whether it was added."""
        audio, tokens, bucket = self.costs(example)
        if not self._fits(audio, tokens):
            return False
        if self.bucket is None:
            self.bucket = bucket
        self.num_cuts += 1
        self.audio_cost += audio
        self.token_cost += tokens
        return True

    def exceeded(self) -> bool:
        return not self._fits(0.0, 0.0)

    def close_to_exceeding(self) -> bool:
        if self.bucket is None:
            return False
        return not self._fits(*self._worst[self.bucket])

    def reject_reason(self, cut: Cut) -> str | None:
        # Same answer as the base class, from the cached costs (this runs once per cut per epoch).
        reason = basic_reject_reason(cut, self.counter)
        if reason is not None:
            return reason
        audio, tokens, bucket = self.costs(cut)
        if isinstance(bucket, str):
            return bucket
        mt = self.cost.max_tokens
        if audio > self.cost.max_duration or (mt is not None and tokens > mt):
            return "over_budget"
        return None

    def fits_alone(self, duration: float, tokens: int, bucket: int) -> bool:
        mt = self.cost.max_tokens
        ok = self.cost.audio(duration, tokens) <= self.cost.max_duration
        return ok and (mt is None or self.cost.tokens(tokens) <= mt)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "cost": asdict(self.cost)}
