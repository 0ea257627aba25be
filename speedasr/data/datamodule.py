"""LightningDataModule: validated cutsets -> sampler (packed by default) -> ``AsrDataset`` batches."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lhotse import CutSet
from lhotse.dataset import DynamicCutSampler

from speedasr.data.batch import PackedBatch, PaddedBatch
from speedasr.data.dataset import AsrDataset, SpecAugmentConfig
from speedasr.data.manifests import ValidationReport, load_cuts, validate_cuts
from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the data comes from and how it is turned into batches."""

    train_cuts: str = ""
    """Training cutset (lhotse ``.jsonl.gz``)."""
    dev_cuts: str | None = None
    """Validation cutset; validation loss and WER are logged when set."""
    tokenizer: str = ""
    """Tokenizer directory (``speedasr tokenizer train``)."""
    layout: Literal["packed", "padded"] = "packed"
    """Batch layout handed to the model: packed (zero padding) or padded (for comparison)."""
    max_duration: float = 30.0
    """Cuts longer than this (seconds) are rejected at validation time, counted in the report."""
    check_audio: Literal["header", "full", "none"] = "header"
    """Audio checks before training: file headers only (fast), full decode, or none."""
    num_workers: int = 1
    """DataLoader worker processes (feature extraction runs there)."""
    val_batch_duration: float = 300.0
    """Seconds of audio per validation batch."""
    val_max_utterances: int | None = None
    """Use only the first N validation cuts (None: all)."""
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    """SpecAugment for training batches."""


class AsrDataModule(pl.LightningDataModule):
    """Builds train/validation dataloaders from ``DataConfig`` + ``SamplerConfig``.

    The sampler's state (position in the epoch, RNG) is saved in checkpoints through
    ``state_dict``/``load_state_dict`` so a resumed run continues with the batches that would have
    come next.
    """

    def __init__(
        self, data: DataConfig, sampler: SamplerConfig, seed: int = 0, report_dir: str | None = None
    ) -> None:
        super().__init__()
        self.cfg = data
        self.sampler_cfg = sampler
        self.seed = seed
        self.report_dir = Path(report_dir) if report_dir else None
        self.tokenizer = Tokenizer.load(data.tokenizer)
        self.train_cuts: CutSet | None = None
        self.dev_cuts: CutSet | None = None
        self.reports: dict[str, ValidationReport] = {}
        self._train_sampler = None
        self._pending_sampler_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_cuts is None and stage in (None, "fit"):
            self.train_cuts = self._load("train", self.cfg.train_cuts)
        if self.dev_cuts is None and self.cfg.dev_cuts:
            cuts = self._load("dev", self.cfg.dev_cuts)
            if self.cfg.val_max_utterances:
                cuts = cuts.subset(first=min(self.cfg.val_max_utterances, len(cuts)))
            self.dev_cuts = cuts

    def _load(self, name: str, path: str) -> CutSet:
        cuts = load_cuts(path)
        accepted, report = validate_cuts(
            cuts, max_duration=self.cfg.max_duration, check_audio=self.cfg.check_audio
        )
        self.reports[name] = report
        if self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            report.write(self.report_dir / f"rejects_{name}.jsonl")
        log.info("%s cuts: %s", name, report.summary())
        return accepted.to_eager()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        self._train_sampler = build_sampler(
            self.train_cuts, self.sampler_cfg, self.tokenizer,
            world_size=world_size, rank=rank, seed=self.seed,
        )  # fmt: skip
        if self._pending_sampler_state is not None:
            self._train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        dataset = AsrDataset(self.tokenizer, layout=self.cfg.layout, spec_augment=self.cfg.spec_augment)
        return self._loader(dataset, self._train_sampler)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if self.dev_cuts is None:
            return []
        with warnings.catch_warnings():  # the dev set is small and read eagerly on purpose
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            sampler = DynamicCutSampler(self.dev_cuts, max_duration=self.cfg.val_batch_duration)
        return self._loader(AsrDataset(self.tokenizer, layout=self.cfg.layout), sampler)

    def _loader(self, dataset, sampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, (PackedBatch, PaddedBatch)):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # Exact resume: Lightning stores this in the checkpoint's "datamodule" state.
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self._train_sampler.state_dict()} if self._train_sampler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_sampler_state = state.get("sampler")
