"""Lhotse Shar: sharded cuts + audio for sequential reads (written by ``speedasr data export-shar``,
``speedasr.prep.shar_export``).

A Shar directory holds ``cuts.000000.jsonl.gz, recording.000000.tar, ...`` (lhotse's layout).
Training reads it wherever a cutset path is expected (``data.train_cuts: DIR``):

* **Lazily.** Cuts stream shard by shard with their audio attached; nothing is held in memory
  beyond the sampler's buffer. Validation runs over the stream in chunks (duplicate ids are tracked
  across the whole set) and keeps only the rejected ids, so a 10,000-hour export validates in
  constant memory.
* **In order, with exact epochs.** Shards are read in order and the speedasr sampler shuffles
  within its buffer, per epoch, from the seed: the same cuts, batches and resume behaviour as the
  JSON-lines cutset it was exported from. In data-parallel training every rank streams the shards
  and keeps its own batches (lhotse's rank handling in the sampler, buckets synchronized), which
  keeps step counts equal and every cut once per epoch; the audio of other ranks' batches is read
  and dropped — the price of exactness over lhotse's ``split_for_dataloading`` shard split, whose
  per-rank epochs differ in length.
* **Local only.** Only a local directory is accepted: lhotse would run ``pipe:`` shard paths as
  shell commands. Cuts inside are validated like any others (``command`` sources are refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speedasr.errors import UserError


def is_shar_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob("cuts.*.jsonl*"))


def open_shar(path: str | Path):
    """The lazy ``CutSet`` of a local Shar directory (shards in order)."""
    from lhotse import CutSet

    text = str(path)
    if text.startswith(("pipe:", "http://", "https://", "s3://", "gs://")) or "://" in text:
        raise UserError(f"Shar input must be a local directory, got '{text}'")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"Shar directory '{path}' does not exist")
    if not is_shar_dir(path):
        raise UserError(f"'{path}' is not a Shar directory (no cuts.NNNNNN.jsonl.gz inside)")
    return CutSet.from_shar(in_dir=path, shuffle_shards=False)


class _Accepted:
    """Picklable filter: cuts not rejected by validation (by id; the first of duplicate ids)."""

    def __init__(self, rejected: set[str], duplicated: set[str]) -> None:
        self.rejected, self.duplicated = rejected, duplicated
        self._seen: set[str] = set()

    def __call__(self, cut) -> bool:
        if cut.id in self.rejected:
            return False
        if cut.id in self.duplicated:  # keep the first occurrence, each epoch
            if cut.id in self._seen:
                return False
            self._seen.add(cut.id)
        return True


class _EpochReset:
    """Wraps ``_Accepted`` so that every iteration (epoch) starts with no ids seen."""

    def __init__(self, cuts, accept: _Accepted) -> None:
        self.cuts, self.accept = cuts, accept

    def __iter__(self):
        self.accept._seen = set()
        return (c for c in self.cuts if self.accept(c))


def load_validated_shar(path: str | Path, chunk: int = 1000, **validate: Any):
    """Open a Shar directory, validate it in a streaming pass; returns ``(lazy accepted cuts,
    ValidationReport)``. ``validate`` goes to ``speedasr.data.manifests.validate_cuts``."""
    from itertools import islice

    from lhotse import CutSet

    from speedasr.data.manifests import ValidationReport, validate_cuts

    cuts = open_shar(path)
    report: ValidationReport | None = None
    rejected: set[str] = set()
    seen: set[str] = set()
    duplicated: set[str] = set()
    stream = iter(cuts)
    while batch := list(islice(stream, chunk)):
        fresh, repeated = [], []
        for cut in batch:
            if cut.id in seen:
                duplicated.add(cut.id)
                repeated.append(cut.id)
            else:
                fresh.append(cut)
            seen.add(cut.id)
        _, part = validate_cuts(CutSet.from_cuts(fresh), **validate)
        for cut_id in repeated:
            part.total += 1
            part.add_reject(cut_id, "duplicate_id", "cut id seen earlier in the cutset")
        rejected.update(r.cut_id for r in part.rejects if r.reason != "duplicate_id")
        report = part if report is None else _merge(report, part)
    if report is None:
        raise UserError(f"Shar directory '{path}' contains no cuts")
    accepted = CutSet(_EpochReset(cuts, _Accepted(rejected, duplicated)))
    return accepted, report


def _merge(a, b):
    a.total += b.total
    a.accepted += b.accepted
    a.total_seconds += b.total_seconds
    a.accepted_seconds += b.accepted_seconds
    a.unchecked_audio += b.unchecked_audio
    a.converted += b.converted
    a.counts.update(b.counts)
    a.rejects += b.rejects
    return a
