"""A toy Lightning project with padded ``(x, x_lens, y, y_lens)`` batches, for trying and testing
the profiler callbacks and report without speedasr's model or data.

``python -m speedasr.profile.testing OUT_DIR`` trains it for a few hundred tiny steps with the three
callbacks (a fake GPU source) and writes a log directory that ``speedasr profile`` can read.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from speedasr.core.geometry import GIB
from speedasr.profile.gpu import GPUSample

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def padded_batch(
    frames: Sequence[int],
    tokens: Sequence[int] | None = None,
    padded_frames: int | None = None,
    padded_tokens: int | None = None,
    num_features: int = 4,
) -> tuple[torch.Tensor, ...]:
    """``(x, x_lens[, y, y_lens])``: ``x: (B, T_pad, F)`` zero-padded, ``y: (B, L_pad)`` int64."""
    t_pad = padded_frames or max(frames)
    x = torch.zeros(len(frames), t_pad, num_features)
    for i, n in enumerate(frames):
        x[i, :n] = 1.0
    x_lens = torch.tensor(frames, dtype=torch.int64)
    if tokens is None:
        return x, x_lens
    l_pad = padded_tokens or max(tokens)
    y = torch.zeros(len(tokens), l_pad, dtype=torch.int64)
    for i, n in enumerate(tokens):
        y[i, :n] = 1
    return x, x_lens, y, torch.tensor(tokens, dtype=torch.int64)


def random_batches(num_batches: int, seed: int = 0, frame_budget: int = 4000) -> list[Batch]:
    """Randomly batched utterances with long-tailed durations (frames at 10 ms) and ~3 tokens/s
    transcripts: as much padding as random batching gives, and a varied batch shape map."""
    rng = random.Random(seed)
    batches = []
    for _ in range(num_batches):
        frames, tokens = [], []
        while True:
            n = int(min(3000, max(50, rng.lognormvariate(math.log(600), 0.6))))
            if frames and max(max(frames), n) * (len(frames) + 1) > frame_budget:
                break
            frames.append(n)
            tokens.append(max(1, int(n / 100 * rng.uniform(1.5, 4.5))))
        batches.append(padded_batch(frames, tokens, num_features=2))
    return batches


class ToyModule(pl.LightningModule):
    """A linear layer over padded batches; ``step_seconds`` makes steps long enough to sample."""

    def __init__(self, step_seconds: float = 0.0, val_seconds: float = 0.0) -> None:
        super().__init__()
        self.step_seconds = step_seconds
        self.val_seconds = val_seconds
        self.proj = torch.nn.LazyLinear(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch["x"]
        return self.proj(x).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.val_seconds:
            time.sleep(self.val_seconds)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(batches: Sequence[Any]) -> DataLoader:
    """Yields the given batches as they are (no collation)."""
    return DataLoader(list(batches), batch_size=None, shuffle=False)


class FakeGPU:
    """A ``GPUSample`` source: utilization and memory follow a slow wave (thread-safe enough)."""

    def __init__(self, total_gib: float = 80.0) -> None:
        self.calls = 0
        self.total = int(total_gib * GIB)

    def __call__(self) -> GPUSample:
        self.calls += 1
        phase = self.calls / 25
        util = 70 + 25 * math.sin(phase)
        used = int((40 + 10 * math.sin(phase / 2)) * GIB)
        return GPUSample(utilization=util, memory_used=used, memory_total=self.total)


def toy_flops(batch: Batch) -> float:
    """Made-up training FLOPs, proportional to the real frames (for MFU plots)."""
    return 1e6 * float(batch[1].sum())


def main(argv: list[str]) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from speedasr.train.callbacks import (
        GPUUtilizationMonitor,
        PaddingMonitor,
        SpeechThroughputMonitor,
    )

    out = argv[0] if argv else "toy_logs"
    padding = PaddingMonitor(frame_shift=0.01)
    gpu = GPUUtilizationMonitor(0.002, source=FakeGPU())
    speed = SpeechThroughputMonitor(flops_per_batch=toy_flops, peak_flops=1.5e12, frame_shift=0.01)
    trainer = pl.Trainer(
        max_steps=300,
        logger=CSVLogger(out, name="toy"),
        callbacks=[padding, gpu, speed],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ToyModule(step_seconds=0.002), loader(random_batches(300)))
    print("\n".join([padding.summary(), gpu.summary(), speed.summary()]))
    print(f"logs in {trainer.loggers[0].log_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
