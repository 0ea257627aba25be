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

``LogProgressBar`` reports training progress as plain lines where the output is a log file.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar


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


def host_rss_bytes(pid: int | None = None) -> int | None:
    """Memory of a process and all its descendants (DataLoader workers), in bytes: the sum of
    their proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so
    copy-on-write pages of forked workers are not counted twice as with RSS). Falls back to RSS
    without ``smaps_rollup``; None where /proc is not available."""
    import os

    root = pid or os.getpid()
    try:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(entry.path, "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        total, todo = 0, [root]
        while todo:
            p = todo.pop()
            total += _process_memory(p)
            todo += children.get(p, [])
        return total
    except OSError:
        return None


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def limit_heap_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that contends for the heap its own arena (up to 8 per core);
    varied tensor sizes then fragment every arena and resident memory creeps up over epochs.
    Call before training starts."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_free_heap() -> None:
    """Give free heap pages back to the OS (glibc ``malloc_trim``); once per epoch is cheap."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _process_memory(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


_RSS_EVERY = 10
"""Training steps between host-memory samples."""
HEAP_SLACK = 0.5
"""Free heap pages are given back once this process's resident memory has grown by this fraction
(and at least ``HEAP_SLACK_MIN`` bytes) since they were last given back."""
HEAP_SLACK_MIN = 32 * 2**20


def _resident_bytes() -> int | None:
    """Resident memory of this process alone (``/proc/self/statm``: one small read, ~10 µs)."""
    import os

    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Keeps freed-but-retained heap memory bounded during an epoch.

    glibc keeps freed memory in its arenas for reuse. With tensors of ever-changing sizes the
    arenas fragment, and a training process's resident memory climbs all through an epoch
    (docs/benchmarks.md, "Host memory": by ~50% within one epoch on the demo corpus) although
    little of it is alive. ``malloc_trim`` gives the free pages back, but each call costs tens of
    ms and the pages must be faulted in again when reused (trimming about every 5 steps slowed the
    tiny benchmark run by ~15%), so this trims only when resident memory has grown by ``slack``
    since the last trim: resident memory at the end of a step stays below ``1 + slack`` times what
    a trim leaves. Memory that is alive is never touched: a trim that frees little just raises
    the bar.
    """

    def __init__(self, slack: float = HEAP_SLACK, slack_min: int = HEAP_SLACK_MIN) -> None:
        self.slack, self.slack_min = slack, slack_min
        self.limit: int | None = None
        self.trims = 0

    def step(self) -> bool:
        """Call once per training step; True when it trimmed."""
        resident = _resident_bytes()
        if resident is None:
            return False
        if self.limit is None:
            self._set_limit(resident)
            return False
        if resident <= self.limit:
            return False
        self.trim()
        return True

    def trim(self) -> None:
        """Give free heap pages back now and measure the bar from what is left."""
        release_free_heap()
        self.trims += 1
        resident = _resident_bytes()
        if resident is not None:
            self._set_limit(resident)

    def _set_limit(self, resident: int) -> None:
        self.limit = resident + max(int(resident * self.slack), self.slack_min)


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


class LogProgressBar(ProgressBar):
    """Training progress as plain lines, for a log file (Lightning's bar suits a terminal).

    Every ``every_n_steps`` optimizer steps, and when training ends, one line such as::

        train: step 200/800 (25%), epoch 3, batch 12, 1.9 steps/s, 1:45 elapsed, 5:16 left,
        train/loss=2.345   (on one line)

    Steps count optimizer updates of the whole run (``trainer.global_step``, which a resumed run
    continues); the total is ``trainer.max_steps``, or ``max_epochs`` times the epoch's length when
    the loader has one (unknown for lhotse's samplers: then no total). ``batch`` counts the
    epoch's batches so far, ``/N`` added when the epoch length is known. After each validation, one
    line with its metrics. Lightning's ``TQDMProgressBar`` would instead draw an epoch bar whose
    total is the remaining step budget and which redraws only at multiples of its refresh rate
    within an epoch: in epochs shorter than that it printed ``Epoch 1: 0%, 0/735`` and never moved.
    """

    def __init__(self, every_n_steps: int = 100, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._start_time = 0.0
        self._start_step = 0
        self._printed_step = -1
        self._epoch = self._batch = 0  # of the last training batch

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            stream = self.stream if self.stream is not None else sys.stderr
            print(*args, file=stream, flush=True, **kwargs)

    def total_steps(self, trainer) -> int | None:
        """Optimizer steps the run will take, or None when unknown (no max_steps and an epoch of
        unknown length)."""
        totals = []
        if trainer.max_steps is not None and trainer.max_steps > 0:
            totals.append(trainer.max_steps)
        epoch = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(epoch):
            steps_per_epoch = math.ceil(epoch / trainer.accumulate_grad_batches)
            totals.append(trainer.max_epochs * steps_per_epoch)
        return min(totals) if totals else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_time = time.monotonic()
        self._start_step = self._printed_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._epoch, self._batch = trainer.current_epoch, batch_idx + 1
        step = trainer.global_step
        if step != self._printed_step and step % self.every_n_steps == 0:
            self._print_train(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._printed_step:
            self._print_train(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val")
        }
        self.print(
            f"validation: step {trainer.global_step}, epoch {trainer.current_epoch}"
            + _format_metrics(metrics)
        )

    def _print_train(self, trainer, pl_module) -> None:
        step, total = trainer.global_step, self.total_steps(trainer)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        epoch_batches = trainer.num_training_batches
        known = math.isfinite(epoch_batches)
        parts.append(
            f"epoch {self._epoch}, batch {self._batch}" + (f"/{epoch_batches}" if known else "")
        )
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} steps/s, {_clock(elapsed)} elapsed")
            if total:
                parts.append(f"{_clock(max(total - step, 0) / rate)} left")
        metrics = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("train")
        }
        self.print("train: " + ", ".join(parts) + _format_metrics(metrics))
        self._printed_step = step


def _format_metrics(metrics: dict[str, Any]) -> str:
    items = []
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        items.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return (", " + ", ".join(items)) if items else ""


def _clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
