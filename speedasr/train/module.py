"""Thin LightningModule around ``AEDModel``: loss, validation WER, optimizer and schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import pytorch_lightning as pl
import torch

from speedasr.checkpoint import tokenizer_from_state
from speedasr.core.batch import PackedBatch, PaddedBatch
from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.data.tokenizer import Tokenizer
from speedasr.decoding import DecodingOptions
from speedasr.decoding.transcribe import transcribe_batch
from speedasr.metrics import word_error_rate
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.models.sizing import count_flops
from speedasr.nn.batchnorm import take_part_without_frames


@dataclass
class OptimConfig:
    """AdamW with linear warmup and a decay schedule."""

    lr: float = 1e-3
    """Peak learning rate (reached at the end of warmup)."""
    weight_decay: float = 1e-3
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_steps: int = 500
    """Linear warmup from 0 to ``lr``, in optimizer steps."""
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    """Decay after warmup; cosine decays to ``min_lr_ratio * lr`` at the last step."""
    min_lr_ratio: float = 0.05
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""


class AsrModule(pl.LightningModule):
    """Trains an ``AEDModel``; logs ``train/loss``, ``val/loss`` and ``val/wer`` (attention decoder,
    greedy), plus ``val/ctc_wer`` (greedy CTC head) when the model has a CTC head.

    Hyperparameters are saved as plain dicts (lists, not tuples: ``hparams.yaml`` is safe YAML
    that ``speedasr train --config`` reads) and the tokenizer as bytes, so a checkpoint is
    self-contained and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(
        self, model: dict[str, Any], optim: dict[str, Any], tokenizer_state: dict[str, Any]
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer_state"])
        self.model_cfg = ModelConfig(**model)
        optim_cfg = OptimConfig(**optim)
        self.optim_cfg = replace(optim_cfg, betas=tuple(optim_cfg.betas))  # saved as a list
        self.tokenizer = tokenizer_from_state(tokenizer_state)
        self.model = AEDModel(self.model_cfg)
        self.nemo_files: dict[str, Any] | None = None
        """NeMo's original config and tokenizer files of an imported model (``init_from``),
        carried in every checkpoint for ``speedasr export-nemo``."""
        self._no_decay = {n for n, p in self.model.named_parameters() if p.ndim < 2}
        self._val_hyps: list[str] = []
        self._val_ctc_hyps: list[str] = []
        self._val_refs: list[str] = []

    @classmethod
    def build(
        cls, model: ModelConfig, optim: OptimConfig, tokenizer: Tokenizer | AggregateTokenizer
    ) -> AsrModule:
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(optim).items()}
        return cls(asdict(model), plain, tokenizer.to_state())

    # --- checkpoint: keep the tokenizer inside ---------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer"] = self.tokenizer.to_state()
        if self.nemo_files is not None:
            checkpoint["nemo"] = self.nemo_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(checkpoint.get("nemo"), dict):  # resume: carry them on
            self.nemo_files = checkpoint["nemo"]

    # --- steps ------------------------------------------------------------------------------------
    def flops_per_batch(self, batch: PackedBatch | PaddedBatch) -> float:
        """Training FLOPs of a batch's real content (SpeechThroughputMonitor's MFU reads it)."""
        return float(
            sum(
                count_flops(self.model_cfg, t, n).training
                for t, n in zip(
                    batch.feature_segments.lengths, batch.token_segments.lengths, strict=True
                )
            )
        )

    def training_step(self, batch: PackedBatch | PaddedBatch, batch_idx: int) -> torch.Tensor:
        n = batch.batch_size
        if n == 0:
            # Every cut of the batch failed to load. A zero loss that touches every parameter keeps
            # data-parallel ranks in lock step; ``FaultMonitor`` then skips the optimizer step.
            # BatchNorm's statistics are all-reduced in the others' forward and backward: join.
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero + take_part_without_frames(self.model)
        out = self.model(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=n)
        self.log("train/ce_loss", out.ce_loss, batch_size=n)
        if out.ctc_loss is not None:
            self.log("train/ctc_loss", out.ctc_loss, batch_size=n)
        if out.guide_loss is not None:
            self.log("train/guide_loss", out.guide_loss, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return out.loss

    def validation_step(self, batch: PackedBatch | PaddedBatch, batch_idx: int) -> None:
        out = self.model(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        packed = batch.to_packed() if isinstance(batch, PaddedBatch) else batch
        encoded = self.model.encode(packed.features, packed.feature_segments)
        self._val_hyps += transcribe_batch(self.model, self.tokenizer, packed, encoded=encoded)
        if self.model.ctc_head is not None:  # what the encoder alone has learned
            ctc = DecodingOptions(method="ctc")
            self._val_ctc_hyps += transcribe_batch(
                self.model, self.tokenizer, packed, ctc, encoded=encoded
            )
        self._val_refs += batch.texts

    def on_validation_epoch_end(self) -> None:
        if self._val_refs:
            wer = word_error_rate(self._val_refs, self._val_hyps)
            self.log("val/wer", wer, prog_bar=True, sync_dist=True)
            if self._val_ctc_hyps:
                ctc_wer = word_error_rate(self._val_refs, self._val_ctc_hyps)
                self.log("val/ctc_wer", ctc_wer, prog_bar=True, sync_dist=True)
        self._val_hyps, self._val_ctc_hyps, self._val_refs = [], [], []

    # --- optimization -----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        # Biases and norm gains get no weight decay. Decided by name from the shapes recorded at
        # construction: FSDP flattens parameters, so their shapes cannot be trusted here.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if _clean_name(name) in self._no_decay else decay).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_lambda(cfg, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def _clean_name(name: str) -> str:
    """A parameter's name without the wrapper prefixes FSDP/activation checkpointing insert."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Learning-rate multiplier per optimizer step (a picklable callable for LambdaLR)."""
    return _Schedule(cfg.schedule, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)


@dataclass(frozen=True)
class _Schedule:
    kind: str
    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            return math.sqrt(max(self.warmup, 1) / max(step, 1))
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
