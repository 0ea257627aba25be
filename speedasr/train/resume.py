"""Exact mid-epoch resume: which batch of the epoch is running, and randomness that depends on it.

Two things make a resumed run diverge from an uninterrupted one, and this module removes both:

* **Data position.** DataLoader workers prefetch, so the sampler in the main process runs ahead of
  the batches the model has actually consumed; its own ``state_dict`` would skip the prefetched
  batches on resume. Instead ``TrainingProgress`` tells the datamodule when a batch *starts a
  training step*; the datamodule saves that batch's ``(epoch, batches consumed)`` in the
  checkpoint and, on resume, fast-forwards a fresh sampler of the same epoch and seed by exactly
  that many batches, or starts the next epoch if none is left (``speedasr.train.datamodule``).
* **Randomness.** Dropout draws from torch's global generator, whose state after N steps depends on
  everything that ran before (including prefetching). ``TrainingProgress`` reseeds it at the start
  of every training batch from ``(seed, epoch, batch index, rank)``, so a batch's dropout masks do
  not depend on the history of the process. (Augmentation is seeded per batch the same way, in the
  dataset workers.) The generators' states are also saved in the checkpoint and restored, for code
  outside speedasr that draws from them.

Works in any Lightning project: the datamodule hook is used only if the datamodule has
``batch_started(epoch) -> int``.

The pieces: ``TrainingProgress`` (the callback), ``ResumableSampler`` and ``SeededBatches`` (the
datamodule's train loader), ``sampler_fingerprint`` (a resumed run must sample as the saved one),
``batch_seed`` and the generator states. The datamodule saves and checks the position in its
checkpoint state (``AsrDataModule.state_dict``/``load_state_dict``); the samplers' own
``state_dict`` (``speedasr.data.sampling``) is not what a training run resumes from.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch

from speedasr.train.host_memory import HeapTrimmer, host_rss_bytes

if TYPE_CHECKING:
    from speedasr.data.sampling import SamplerConfig


def batch_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    """A 63-bit seed for batch ``index`` of ``epoch`` on ``rank`` (stable across runs/processes)."""
    g = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, rank])
    return int(g.generate_state(2, dtype=np.uint32).astype(np.uint64).dot([1 << 31, 1]))


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and NumPy generator states, as checkpoint-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_RSS_EVERY = 10
"""Training steps between host-memory samples."""


class TrainingProgress(pl.Callback):
    """Counts consumed training batches per epoch, seeds each batch, saves RNG states; logs host
    memory (PSS of this process and its DataLoader workers) at the end of each epoch
    (``host/rss_mib``) and its peak sampled every 10 steps (``host/peak_rss_mib``).

    Args:
        seed: the run's seed.
        record_dir: if set, appends one JSON line per training batch to
            ``record_dir/batches_rank{R}.jsonl``: ``{"epoch", "index", "step", "cut_ids"}`` (an
            audit trail of which cuts each rank trained on, in order).
    """

    def __init__(self, seed: int = 0, record_dir: str | Path | None = None) -> None:
        self.seed = seed
        self.record_dir = Path(record_dir) if record_dir else None
        self.epoch = -1
        self.batches = 0
        self._epoch_rss = 0
        self.heap = HeapTrimmer()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        epoch = trainer.current_epoch
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "batch_started"):
            index = datamodule.batch_started(epoch)
        else:  # no speedasr datamodule: count here (not exact across resume)
            if epoch != self.epoch:
                self.epoch, self.batches = epoch, 0
            index, self.batches = self.batches, self.batches + 1
        torch.manual_seed(batch_seed(self.seed, epoch, index, trainer.global_rank))
        if self.record_dir is not None:
            row = {
                "epoch": epoch,
                "index": index,
                "step": trainer.global_step,
                "cut_ids": list(getattr(batch, "cut_ids", [])),
            }
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / f"batches_rank{trainer.global_rank}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.heap.step()
        if trainer.global_step % _RSS_EVERY == 0:  # workers are alive now, unlike at epoch end
            rss = host_rss_bytes()
            self._epoch_rss = max(self._epoch_rss, rss or 0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Memory must stay flat across epochs (docs/benchmarks.md, "Host memory"). The end of an
        # epoch is a comparable point from one epoch to the next (persistent workers are alive,
        # no batch in flight); the sampled peak also depends on which batches were sampled.
        peak, self._epoch_rss = self._epoch_rss, 0
        self.heap.trim()
        now = host_rss_bytes()
        if now:
            pl_module.log("host/rss_mib", now / 2**20, on_epoch=True, on_step=False)
            pl_module.log("host/peak_rss_mib", max(peak, now) / 2**20, on_epoch=True, on_step=False)
            pl_module.log("host/heap_trims", float(self.heap.trims), on_epoch=True, on_step=False)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(), "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches = state.get("epoch", -1), state.get("batches", 0)
        if "rng" in state:
            set_rng_state(state["rng"])


def sampler_fingerprint(cfg: SamplerConfig) -> dict[str, Any]:
    """The sampler settings that decide which batches an epoch has (plain values)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a lhotse sampler: yields ``(cuts, batch_seed)``, can resume at any batch of any
    epoch, and remembers the position ``(epoch, index in epoch)`` of every batch it yielded.
    ``set_epoch`` is forwarded, so Lightning's per-epoch call works.

    Lightning creates the DataLoader iterator (which starts this iterator to prefetch) *before*
    it calls ``set_epoch`` for the epoch it resumes, so a resumed position is held here and
    applied by the next ``__iter__`` whatever the order of the calls: that iteration runs the
    resumed epoch from the first batch not consumed, and if the epoch had no batch left (the
    checkpoint was written at its last batch), the next epoch from its first batch.
    """

    def __init__(self, sampler, seed: int, rank: int) -> None:
        self.sampler = sampler
        self.seed, self.rank = seed, rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.yielded: deque[tuple[int, int]] = deque()
        """Positions ``(epoch, index)`` of the batches yielded by the current iteration and not
        yet claimed by ``next_position`` (the DataLoader keeps batches in order)."""

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.sampler.set_epoch(epoch)

    def resume(self, epoch: int, batches: int) -> None:
        """The next iteration continues after the first ``batches`` batches of ``epoch``."""
        self._resume = (epoch, batches)

    def next_position(self) -> tuple[int, int]:
        """``(epoch, index in epoch)`` of the next batch the DataLoader hands out (in order)."""
        return self.yielded.popleft()

    def __iter__(self):
        self.yielded.clear()  # a new iteration: the DataLoader dropped the previous one's batches
        resume, self._resume = self._resume, None
        if resume is None:
            yield from self._epoch_batches(start=0)
            return
        epoch, consumed = resume
        self.set_epoch(epoch)
        yielded = yield from self._epoch_batches(start=consumed)
        if not yielded:  # the epoch was complete: continue with the next one
            self.set_epoch(epoch + 1)
            yield from self._epoch_batches(start=0)

    def _epoch_batches(self, start: int):
        """This epoch's batches from index ``start`` on (earlier ones are sampled and dropped:
        metadata only). Returns how many it yielded."""
        yielded = 0
        for index, cuts in enumerate(iter(self.sampler)):
            if index >= start:
                self.yielded.append((self.epoch, index))
                yield cuts, batch_seed(self.seed, self.epoch, index, self.rank)
                yielded += 1
        return yielded


class SeededBatches(torch.utils.data.Dataset):
    """Runs a lhotse-style dataset on ``(cuts, seed)`` with torch, NumPy and Python's generators
    seeded for that batch (and restored after), so augmentation is a function of the batch."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item):
        import random

        import numpy as np

        cuts, seed = item
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are not touched
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            return self.dataset[cuts]
        finally:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])
