"""Typed configuration of a training run. A run is data: a YAML file plus dotted overrides.

Every field has a docstring line; ``speedasr train --help`` prints them. Unknown keys and values of
the wrong type are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speedasr.data.datamodule import DataConfig
from speedasr.data.sampling import SamplerConfig
from speedasr.models.aed import ModelConfig
from speedasr.train.module import OptimConfig


@dataclass
class TrainerConfig:
    """Settings passed to ``pytorch_lightning.Trainer`` (see its docs for details)."""

    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use max_epochs)."""
    max_epochs: int | None = 10
    """Stop after this many epochs (None: use max_steps)."""
    max_time: str | None = None
    """Wall-clock limit "DD:HH:MM:SS" (None: no limit)."""
    accelerator: str = "auto"
    """cpu, gpu, auto."""
    devices: int | str = "auto"
    """Devices per node."""
    num_nodes: int = 1
    """Nodes (multi-node via torchrun or SLURM)."""
    strategy: str = "auto"
    """auto, ddp, fsdp (or any Lightning strategy name); see docs/distributed.md."""
    precision: str = "32-true"
    """32-true, bf16-mixed, 16-mixed."""
    gradient_clip_val: float | None = 1.0
    """Clip the gradient norm to this value (None: no clipping)."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    val_check_interval: int | float | None = None
    """Validate every N training steps (int) or fraction of an epoch (float); None: every epoch."""
    check_val_every_n_epoch: int | None = 1
    """Validate every N epochs (None when val_check_interval is a step count across epochs)."""
    log_every_n_steps: int = 10
    """Logging interval in steps."""
    enable_progress_bar: bool = True
    """Lightning's progress bar."""
    num_sanity_val_steps: int = 0
    """Validation batches run before training (0: skip)."""


@dataclass
class MonitorsConfig:
    """Profiling callbacks (``speedasr.train.callbacks``) enabled during training."""

    padding: bool = True
    """PaddingMonitor: padding fraction of frames, tokens and attention per step."""
    gpu: bool = True
    """GPUUtilizationMonitor: NVML utilization and memory (does nothing without a GPU)."""
    throughput: bool = True
    """ThroughputMonitor: real audio seconds, frames and tokens per second; MFU on GPUs."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written (``out_dir/checkpoints``; ``last.ckpt`` is always kept)."""

    every_n_steps: int | None = None
    """Also save every N optimizer steps, mid-epoch (``step{N}.ckpt``): what a crashed run resumes
    from. None: only at validation and at the end of each epoch."""
    keep: int = 2
    """Step checkpoints kept (the newest); -1 keeps all."""
    overwrite: bool = False
    """A run without ``resume`` may start in an out_dir whose checkpoints/ holds an earlier run's
    checkpoints: they are deleted first. False: that is an error (they would be overwritten)."""


@dataclass
class TrainConfig:
    """A whole training run."""

    out_dir: str = "exp/run"
    """Checkpoints, logs and reports go here."""
    seed: int = 0
    """Seed for weights, sampler and augmentation."""
    resume: str | None = None
    """Checkpoint to resume from, or "last" for out_dir/checkpoints/last.ckpt."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and batch layout."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Which cuts go together in a batch."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model dimensions and encoder/decoder split."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Lightning Trainer settings."""
    monitors: MonitorsConfig = field(default_factory=MonitorsConfig)
    """Profiling callbacks."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint schedule."""
    record_batches: bool = False
    """Append the cut ids of every training batch to ``out_dir/batches_rank{R}.jsonl`` (audit
    trail: which cuts each rank trained on, in order)."""
