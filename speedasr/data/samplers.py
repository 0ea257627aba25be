"""speedasr's sampler classes, built by ``speedasr.data.sampling.build_sampler``: lhotse's
samplers with rejection counts (``Rejections``, every mode), and the 2D sampler whose batches are
assembled by ``_Bucketer2D`` under a padded or a packed constraint (``speedasr.data.constraints``,
``speedasr.data.packing``). ``Bucket2DSampler``'s state dict holds the constraint's configuration,
so ``load_state_dict`` resumes mid-epoch (lhotse 1.33 refuses ``state_dict`` with a custom
constraint).
"""

from __future__ import annotations

import copy
import random
import warnings
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset.dataloading import resolve_seed
from lhotse.dataset.sampling.base import CutSampler, EpochDiagnostics
from lhotse.dataset.sampling.dynamic import DynamicCutSampler
from lhotse.dataset.sampling.dynamic_bucketing import (
    BucketSelectionState,
    DynamicBucketer,
    DynamicBucketingSampler,
)

from speedasr.data.bucketing import (
    BucketBins,
    TokenCounter,
)
from speedasr.data.constraints import Bucket2DConstraint, Bucketed2DConstraint
from speedasr.data.packing import PackingConstraint, PackingCost


class Rejections:
    """Cuts a sampler refused in the current epoch: counts by reason, first few ids of each."""

    def __init__(self, max_examples: int = 10) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def record(self, cut: Cut, reason: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(cut.id)

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "counts": dict(self.counts), "examples": dict(self.examples)}

    def report(self) -> str:
        if not self.counts:
            return "no cuts rejected"
        parts = [
            f"{r}: {n} (e.g. {', '.join(self.examples[r][:3])})"
            for r, n in sorted(self.counts.items())
        ]
        return f"{self.total} cuts rejected — " + "; ".join(parts)


class _Accepts:
    """Filter predicate recording why cuts are rejected (picklable, unlike a lambda)."""

    def __init__(self, check, rejections: Rejections) -> None:
        self.check, self.rejections = check, rejections

    def __call__(self, cut: Cut) -> bool:
        reason = self.check(cut)
        if reason is None:
            return True
        self.rejections.record(cut, reason)
        return False


class _RejectionsMixin:
    """Adds ``rejected``, reset when an epoch starts. A resumed sampler re-counts while it
    fast-forwards, so counts stay exact after ``load_state_dict``."""

    rejected: Rejections

    def _init_rejections(self, check) -> None:
        self.rejected = Rejections()
        self.filter(_Accepts(check, self.rejected))

    def __iter__(self):
        if not self._just_restored_state:
            self.rejected.reset()
        return super().__iter__()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(copy.deepcopy(sd))  # lhotse empties the dict it is given

    def _fast_forward(self) -> None:
        # lhotse's version replays ``total_batches`` batches, but its filter counts every
        # rejected cut as a discarded *batch*: resume would skip one batch per rejected cut.
        # Only the batches this rank kept were consumed.
        epoch = self.diagnostics.current_epoch
        num_batches = self.diagnostics.current_epoch_stats.kept_batches
        self.set_epoch(epoch)
        self.diagnostics.stats_per_epoch[epoch] = EpochDiagnostics(epoch=epoch)
        self._just_restored_state = False
        iter(self)
        for _ in range(num_batches):
            next(self)
        self._just_restored_state = True


class RandomSampler(_RejectionsMixin, DynamicCutSampler):
    """lhotse's ``DynamicCutSampler`` with rejection accounting."""


class Bucket1DSampler(_RejectionsMixin, DynamicBucketingSampler):
    """lhotse's ``DynamicBucketingSampler`` (duration buckets) with rejection accounting."""


_TOP_UP_TRIES = 8
"""Packed mode: cuts tried after a batch is "full" (no room left for the bucket's largest cut)."""


class _Bucketer2D(DynamicBucketer):
    """lhotse's ``DynamicBucketer`` (same buffer, bucket choice and DDP sync) with its own batch
    assembly: a cut is added only if the batch stays within budget (so, unlike lhotse's batcher,
    a batch never overshoots its budget); packed batches keep adding cuts of their bucket that
    still fit, then, if the bucket ran out, cuts of the nearest buckets (packing never pads, so
    mixing is free).

    In packed mode each bucket's total cost is kept up to date, so "is this bucket ready" is O(1)
    instead of lhotse's walk over the bucket.
    """

    def __init__(self, *args, mix: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mix = mix
        self.packed = isinstance(self.constraint, PackingConstraint)
        self._index = {id(q): k for k, q in enumerate(self.buckets)}
        self._audio = [0.0] * len(self.buckets)
        self._tokens = [0.0] * len(self.buckets)

    def __iter__(self):
        self.cuts_iter = iter(self.cuts)
        self._collect_cuts_in_buckets(self.buffer_size)
        state = BucketSelectionState(
            bucket_rng=self.bucket_rng, num_buckets=len(self.buckets), world_size=self.world_size
        )
        try:
            while True:
                first = self._index[id(self._select_bucket(state))]
                constraint = self.constraint.copy()
                batch, exhausted = self._take(first, constraint)
                if exhausted and self.packed and self.mix:
                    for k in sorted(range(len(self.buckets)), key=lambda k: (abs(k - first), k)):
                        if k != first and self.buckets[k].qsize():
                            more, exhausted = self._take(k, constraint)
                            batch += more
                            if not exhausted:
                                break
                yield CutSet.from_cuts(batch)
                self._collect_cuts_in_buckets(len(batch))
        except StopIteration:
            pass
        finally:
            self.cuts_iter = None

    def _collect_cuts_in_buckets(self, n_cuts: int) -> None:
        # Appending to the queues' deques directly: the non-concurrent bucketer is single-threaded
        # and Queue.put's locking costs as much as the rest of this loop.
        constraint, buckets = self.constraint, self.buckets
        if not self.packed:
            for cut in islice(self.cuts_iter, n_cuts):
                buckets[constraint.select_bucket(None, example=cut)].queue.append(cut)
            return
        audio_sum, token_sum = self._audio, self._tokens
        for cut in islice(self.cuts_iter, n_cuts):
            audio, tokens, k = constraint.costs(cut)
            buckets[k].queue.append(cut)
            audio_sum[k] += audio
            token_sum[k] += tokens

    def _is_ready(self, bucket) -> bool:
        """Does bucket ``bucket`` hold a full batch? O(1): packed mode from the bucket's total
        cost, padded mode from its count and its upper corner."""
        n = bucket.qsize()
        if not n:
            return False
        k = self._index[id(bucket)]
        c = self.constraint.copy()
        if self.packed:
            c.bucket, c.audio_cost, c.token_cost = k, self._audio[k], self._tokens[k]
        else:
            c.bucket, c.num_cuts = k, n
            c.longest_s, c.longest_t = c.corner(k)
        return c.close_to_exceeding()

    def _take(self, k: int, constraint) -> tuple[list[Cut], bool]:
        """Remove and return the cuts of bucket ``k`` that go in this batch, and whether the
        whole bucket was looked at without the batch becoming full."""
        items = self.buckets[k].queue  # a deque; nothing else touches it while we sample
        order = list(range(len(items)))
        if self.shuffle:
            self.rng.shuffle(order)
        taken, full, misses = [], False, 0
        for i in order:
            cut = items[i]
            if full:
                # Packed and past the reserve for a worst-case cut: a few more tries with the
                # actual cuts, which are usually smaller than the bucket's corner.
                if constraint.try_add(cut):
                    taken.append(i)
                else:
                    misses += 1
                    if misses == _TOP_UP_TRIES:
                        break
                continue
            if not constraint.try_add(cut):
                continue
            taken.append(i)
            if constraint.close_to_exceeding():
                full = True
                if not self.packed:  # padded: (n + 1) × longest is over budget, nothing fits
                    break
        batch = [items[i] for i in taken]
        for i in sorted(taken, reverse=True):
            del items[i]
        if self.packed:
            if items:
                for cut in batch:
                    audio, tokens, _ = constraint.costs(cut)
                    self._audio[k] -= audio
                    self._tokens[k] -= tokens
            else:  # no float drift left behind
                self._audio[k] = self._tokens[k] = 0.0
        return batch, not full


def _filtered(cuts: Iterable[Cut], predicate, diagnostics) -> Iterable[Cut]:
    for cut in cuts:
        if predicate(cut):
            yield cut
        else:
            diagnostics.discard_single(cut)


class Bucket2DSampler(_RejectionsMixin, DynamicBucketingSampler):
    """``DynamicBucketingSampler`` over 2D buckets with a speedasr constraint (padded or packed).

    Its state dict holds the constraint's configuration (bins, budget) next to lhotse's progress;
    ``load_state_dict`` restores that configuration and fast-forwards to the same batch.
    """

    def __init__(
        self,
        cuts: CutSet,
        constraint: Bucketed2DConstraint,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        buffer_size: int = 20000,
        mix_buckets: bool = True,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            super().__init__(
                cuts,
                constraint=constraint,
                duration_bins=list(range(constraint.bins.num_buckets - 1)),
                shuffle=shuffle,
                drop_last=drop_last,
                buffer_size=buffer_size,
                world_size=world_size,
                rank=rank,
                seed=seed,
                sync_buckets=True,
            )
        self.mix_buckets = mix_buckets
        self._init_rejections(constraint.reject_reason)

    def __iter__(self) -> Bucket2DSampler:
        if self._just_restored_state:
            return self
        self.rejected.reset()
        self.rng = random.Random(resolve_seed(self.seed) + self.epoch)
        # Same bucket-choice RNG on every rank (and per dataloader worker id): ranks draw their
        # batches of a step from the same bucket, as lhotse's sync_buckets does.
        worker = torch.utils.data.get_worker_info()
        bucket_rng = random.Random(1234 + (worker.id if worker is not None else 0))
        self.diagnostics.reset_current_epoch()
        cuts = _filtered(self.cuts[0], self._filter_fn, self.diagnostics)
        self.cuts_iter = iter(
            _Bucketer2D(
                cuts,
                duration_bins=self.duration_bins,
                world_size=self.world_size,
                constraint=self.constraint,
                drop_last=self.drop_last,
                buffer_size=self.buffer_size,
                shuffle=self.shuffle,
                rng=self.rng,
                bucket_rng=bucket_rng,
                diagnostics=self.diagnostics,
                mix=self.mix_buckets,
            )
        )
        return self

    def state_dict(self) -> dict[str, Any]:
        sd = CutSampler.state_dict(self)
        sd.update(
            buffer_size=self.buffer_size,
            mix_buckets=self.mix_buckets,
            constraint=self.constraint.config(),
            rejected=self.rejected.as_dict(),
        )
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        sd = copy.deepcopy(sd)  # lhotse pops keys from nested dicts; leave the caller's intact
        saved = sd.pop("constraint")
        if saved != self.constraint.config():
            warnings.warn(
                "sampler state was saved with a different batching configuration; restoring the "
                "saved one so the run resumes with the same batches",
                stacklevel=2,
            )
            self.constraint = constraint_from_config(saved, self.constraint.counter)
            self.duration_bins = list(range(self.constraint.bins.num_buckets - 1))
            self.rejected.reset()
            self._filter_fn = _Accepts(self.constraint.reject_reason, self.rejected)
        self.buffer_size = sd.pop("buffer_size")
        self.mix_buckets = sd.pop("mix_buckets")
        sd.pop("rejected", None)  # recomputed while fast-forwarding
        CutSampler.load_state_dict(self, sd)
        self._fast_forward()


def constraint_from_config(cfg: dict[str, Any], counter: TokenCounter) -> Bucketed2DConstraint:
    """Rebuild a constraint from ``Bucketed2DConstraint.config()`` (sampler state)."""
    bins = BucketBins.from_dict(cfg["bins"])
    if cfg["type"] == "PackingConstraint":
        return PackingConstraint(bins, counter, PackingCost(**cfg["cost"]), strict=cfg["strict"])
    if cfg["type"] == "Bucket2DConstraint":
        return Bucket2DConstraint(
            bins,
            counter,
            strict=cfg["strict"],
            max_duration=cfg["max_duration"],
            max_tokens=cfg["max_tokens"],
            quadratic_duration=cfg["quadratic_duration"],
            batch_sizes=cfg["batch_sizes"],
        )
    raise ValueError(f"unknown constraint type {cfg['type']!r} in sampler state")
