"""The one sampler factory of speedasr: ``build_sampler(cuts, SamplerConfig, tokenizer)``.

Modes (``SamplerConfig.mode``):

* ``packed`` (default): 2D buckets, each batch filled to a packing-cost budget on real content
  (``speedasr.data.packing``); when a bucket runs out (end of epoch), the batch is topped up from
  the nearest buckets, since packing never pads.
* ``bucket2d``: 2D buckets, padded-size budget or per-bucket batch sizes
  (``speedasr.data.bucketing``).
* ``bucket1d``: lhotse's ``DynamicBucketingSampler`` on duration, as shipped (for comparison).
* ``random``: lhotse's ``DynamicCutSampler``, shuffled, no bucketing (for comparison).

Every sampler (the classes are in ``speedasr.data.samplers``) has ``rejected`` (a ``Rejections``:
counts by reason, examples of cut ids) for the current epoch: cuts are never dropped silently.
``state_dict``/``load_state_dict`` resume exactly mid-epoch, in every mode (lhotse 1.33 refuses
``state_dict`` with a custom constraint; the 2D sampler saves the constraint's configuration
instead). In data-parallel training every rank iterates the same sequence and keeps every
``world_size``-th batch, with the bucket choice synchronized across ranks (lhotse's mechanism), so
step counts are equal; at the last step, if fewer cuts than ranks are left, lhotse repeats one (its
id gets a ``_dup`` suffix) so that every rank has a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset.sampling.base import CutSampler

from speedasr.data.bucketing import (
    BucketBins,
    TokenCounter,
    basic_reject_reason,
    estimate_bins,
    measure_cuts,
)
from speedasr.data.constraints import Bucket2DConstraint, Bucketed2DConstraint
from speedasr.data.packing import PackingConstraint, PackingCost
from speedasr.data.samplers import (
    Bucket1DSampler,
    Bucket2DSampler,
    RandomSampler,
)
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError

Mode = Literal["packed", "bucket2d", "bucket1d", "random"]
LAZY_BINS_ESTIMATE_CUTS = 100_000
"""Bins of a lazy cutset (possibly endless) are estimated from this many cuts unless told."""


@dataclass
class SamplerConfig:
    """How training cuts are grouped into batches."""

    mode: Mode = "packed"
    """packed (zero padding), bucket2d (padded, 2D buckets), bucket1d / random (lhotse, padded)."""
    max_duration: float = 600.0
    """Seconds per batch: real audio cost in packed mode, padded ``B × longest`` otherwise."""
    max_tokens: int | None = None
    """Optional decoder-token budget per batch (packed: Σ cost; bucket2d: ``B × longest``)."""
    batch_sizes: list[int] | None = None
    """bucket2d only: a batch size per 2D bucket (``speedasr calibrate``); replaces max_duration."""
    quadratic_duration: float | None = None
    """Seconds; adds ``d²/q`` per utterance (encoder self-attention). 15-40 suits transformers."""
    quadratic_cross: float | None = None
    """packed only, tokens; adds ``d·L/q`` seconds per utterance (cross-attention ``Σ L·T``)."""
    quadratic_tokens: float | None = None
    """packed only, tokens; adds ``L²/q`` to the token cost (decoder self-attention ``Σ L²``)."""
    num_buckets: int = 30
    """Duration buckets (bucket1d: all buckets; 2D: rows, each split by tokens)."""
    num_token_buckets: int = 5
    """2D modes: token sub-buckets per duration bucket."""
    bins: str | None = None
    """2D modes: bins JSON (``speedasr bins``); loaded if it exists, else estimated, saved there."""
    num_cuts_for_bins_estimate: int | None = None
    """2D modes: estimate bins from the first N cuts (None: all of an eager cutset, the first
    100,000 of a lazy one, which may be endless). Cuts longer than all of them are rejected."""
    tps_threshold: float = 4.0
    """2D modes: z-score of tokens/second above which a cut is an outlier in its duration bucket."""
    strict: bool = True
    """2D modes: True rejects TPS outliers (reason tps_outlier); False puts every cut in the
    smallest bucket that fits both dimensions."""
    shuffle: bool = True
    """Shuffle within the buffer (and bucket choice); reproducible from the seed and epoch."""
    drop_last: bool = False
    """Drop the last, incomplete batches (their cuts are counted as discarded by lhotse)."""
    buffer_size: int = 20000
    """Cuts held in the bucket buffers (bucketing modes) or the shuffle buffer (random)."""
    mix_buckets: bool = True
    """packed only: top up a batch from neighbouring buckets when its own bucket runs out."""


# --- factory ---------------------------------------------------------------------------------


def load_or_estimate_bins(
    cuts: Iterable[Cut], cfg: SamplerConfig, counter: TokenCounter
) -> BucketBins:
    """Bins from ``cfg.bins`` if that file exists; else estimated from the cuts (and saved to
    ``cfg.bins`` when set, so the next run reuses them)."""
    if cfg.bins and Path(cfg.bins).is_file():
        bins = BucketBins.load(cfg.bins)
        made_with = bins.meta.get("tokens")
        if made_with is not None and made_with != counter.name:
            warnings.warn(
                f"bins '{cfg.bins}' were made with tokens from {made_with}, "
                f"training counts them with {counter.name}",
                stacklevel=2,
            )
        return bins
    limit = cfg.num_cuts_for_bins_estimate
    if limit is None and getattr(cuts, "is_lazy", False):
        limit = LAZY_BINS_ESTIMATE_CUTS
    sample = islice(cuts, limit) if limit else cuts
    lengths, skipped = measure_cuts(sample, counter)
    bins = estimate_bins(lengths, cfg.num_buckets, cfg.num_token_buckets, cfg.tps_threshold)
    bins.meta.update(tokens=counter.name, skipped=skipped)
    if cfg.bins:
        bins.save(cfg.bins)
    return bins


def build_sampler(
    cuts: CutSet,
    cfg: SamplerConfig,
    tokenizer: Tokenizer | None,
    *,
    world_size: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    bins: BucketBins | None = None,
    counter: TokenCounter | None = None,
) -> CutSampler:
    """The training sampler for ``cfg.mode``; see the module docstring.

    Args:
        cuts: training cuts (eager or lazy) with supervisions.
        tokenizer: counts decoder tokens (prompt + text); None estimates them from characters.
        world_size, rank: data-parallel layout (default: from torch.distributed / env, else 1, 0).
        seed: shuffling seed (the epoch is added; call ``sampler.set_epoch``).
        bins: 2D bins to use instead of ``cfg.bins`` / estimation.
        counter: a shared ``TokenCounter`` (e.g. pre-filled by a benchmark).
    Raises:
        UserError: invalid configuration.
    """
    validate_config(cfg)
    counter = counter or TokenCounter(tokenizer)
    common = dict(drop_last=cfg.drop_last, world_size=world_size, rank=rank, seed=seed)
    if cfg.mode in ("random", "bucket1d"):

        def check(cut: Cut) -> str | None:
            reason = basic_reject_reason(cut, counter)
            if reason is None:
                d = cut.duration
                q = cfg.quadratic_duration
                if (d + d * d / q if q else d) > cfg.max_duration:
                    return "over_budget"
            return reason

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            kw = dict(
                max_duration=cfg.max_duration,
                quadratic_duration=cfg.quadratic_duration,
                shuffle=cfg.shuffle,
                **common,
            )
            if cfg.mode == "random":
                sampler = RandomSampler(cuts, shuffle_buffer_size=cfg.buffer_size, **kw)
            else:
                # lhotse needs 2 <= num_buckets <= cuts; a tiny eager cutset gets fewer buckets.
                n = cfg.num_buckets if cuts.is_lazy else min(cfg.num_buckets, len(cuts))
                bins = [] if n < 2 else None  # [] = one bucket
                try:
                    sampler = Bucket1DSampler(
                        cuts, num_buckets=max(n, 2), duration_bins=bins,
                        buffer_size=cfg.buffer_size, **kw,
                    )  # fmt: skip
                except AssertionError as e:
                    raise UserError(f"sampler (bucket1d): {e}") from None
        sampler._init_rejections(check)
        return sampler
    bins = bins or load_or_estimate_bins(cuts, cfg, counter)
    if cfg.mode == "packed":
        cost = PackingCost(
            max_duration=cfg.max_duration,
            max_tokens=cfg.max_tokens,
            quadratic_duration=cfg.quadratic_duration,
            quadratic_cross=cfg.quadratic_cross,
            quadratic_tokens=cfg.quadratic_tokens,
        )
        constraint: Bucketed2DConstraint = PackingConstraint(bins, counter, cost, cfg.strict)
    else:
        try:
            constraint = Bucket2DConstraint(
                bins,
                counter,
                strict=cfg.strict,
                max_duration=None if cfg.batch_sizes else cfg.max_duration,
                max_tokens=cfg.max_tokens,
                quadratic_duration=cfg.quadratic_duration,
                batch_sizes=cfg.batch_sizes,
            )
        except ValueError as e:
            raise UserError(f"sampler: {e}") from None
    return Bucket2DSampler(
        cuts,
        constraint,
        shuffle=cfg.shuffle,
        buffer_size=cfg.buffer_size,
        mix_buckets=cfg.mix_buckets,
        **common,
    )


def validate_config(cfg: SamplerConfig) -> None:
    """Raise ``UserError`` naming the first invalid or conflicting setting."""
    if cfg.mode not in ("packed", "bucket2d", "bucket1d", "random"):
        raise UserError(
            f"sampler.mode must be packed, bucket2d, bucket1d or random, got {cfg.mode!r}"
        )
    if not cfg.max_duration > 0:
        raise UserError(f"sampler.max_duration must be > 0 seconds, got {cfg.max_duration}")
    for name in ("max_tokens", "quadratic_duration", "quadratic_cross", "quadratic_tokens"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise UserError(f"sampler.{name} must be > 0 or null, got {v}")
    if cfg.num_buckets < 1 or cfg.num_token_buckets < 1:
        raise UserError("sampler.num_buckets and sampler.num_token_buckets must be >= 1")
    if cfg.mode == "bucket1d" and cfg.num_buckets < 2:
        raise UserError("sampler.num_buckets must be >= 2 in bucket1d mode (lhotse needs 2)")
    if cfg.batch_sizes is not None and cfg.mode != "bucket2d":
        raise UserError(f"sampler.batch_sizes applies to bucket2d mode only (mode is {cfg.mode})")
    if cfg.mode != "packed" and (cfg.quadratic_cross or cfg.quadratic_tokens):
        raise UserError("sampler.quadratic_cross / quadratic_tokens apply to packed mode only")
    if cfg.mode in ("random", "bucket1d") and cfg.max_tokens is not None:
        raise UserError(f"sampler.max_tokens is not supported in {cfg.mode} mode")
    if cfg.buffer_size < 1:
        raise UserError(f"sampler.buffer_size must be >= 1, got {cfg.buffer_size}")
