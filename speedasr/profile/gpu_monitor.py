"""``GPUUtilizationMonitor``: GPU utilization and memory sampled in a background thread, logged per
interval and summarized at the end of the run (``speedasr.train.callbacks`` exports it)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer

from speedasr.core.geometry import GIB
from speedasr.profile.gpu import GPUSampler, GPUSampleSource, NvmlSource, UtilizationWindow
from speedasr.profile.step_logger import StepLogger


class GPUUtilizationMonitor(StepLogger):
    """GPU utilization and memory, sampled in a background thread, logged every logging step.

    Logged (over the samples since the last log): ``gpu/utilization_mean`` and
    ``gpu/utilization_min`` (percent of time a kernel ran, NVML), ``gpu/memory_used_gib`` (mean)
    and ``gpu/memory_peak_gib`` (max) of the device memory in use (all processes), and torch's
    ``gpu/torch_peak_allocated_gib`` (``torch.cuda.max_memory_allocated``; never reset here, so
    other users of that counter are undisturbed). Sampling pauses during validation.

    Without a CUDA device or without NVML it warns once and does nothing.

    Args:
        interval_seconds: time between samples.
        log_every_n_steps: logging interval in training batches; default the Trainer's.
        source: zero-argument callable returning a ``GPUSample`` (tests, other telemetry); default
            NVML for the Trainer's device.
    """

    def __init__(
        self,
        interval_seconds: float = 0.5,
        *,
        log_every_n_steps: int | None = None,
        source: GPUSampleSource | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        self.interval_seconds = interval_seconds
        self.source = source
        self.window = UtilizationWindow()
        self.torch_peak_allocated = 0  # bytes
        self._sampler: GPUSampler | None = None
        self._nvml: NvmlSource | None = None
        self._device: torch.device | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = trainer.strategy.root_device
        self._device = device if device.type == "cuda" else None
        source = self.source
        if source is None:
            if self._device is None:
                self._warn_once("gpu", f"no CUDA device (training on {device.type}); disabled")
                return
            try:
                self._nvml = source = NvmlSource(self._device.index or 0)
            except Exception as e:
                self._warn_once("gpu", f"NVML unavailable ({e!r}); install nvidia-ml-py. Disabled")
                return
        self._sampler = GPUSampler(source, self.interval_seconds, self.window)
        self._sampler.start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._count_and_check(trainer) and self._sampler is not None:
            self._log(trainer, self._metrics())

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None:
            self._sampler.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None:
            self._sampler.resume()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sampler is not None and self._batches > self._logged_at:
            self._log(trainer, self._metrics())
        self._shutdown()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException):
        self._shutdown()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "torch_peak_allocated": self.torch_peak_allocated,
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.torch_peak_allocated = int(state["torch_peak_allocated"])
        self._batches = self._logged_at = int(state["batches"])

    def summary(self) -> str:
        w = self.window
        if w.samples == 0:
            return "GPU: not monitored (no CUDA device or NVML)."
        text = (
            f"GPU: utilization {w.utilization_mean:.1f}% (mean of {w.samples:,} samples), "
            f"peak memory used {w.memory_peak / GIB:.2f} GiB"
        )
        if self.torch_peak_allocated:
            text += f", torch peak allocated {self.torch_peak_allocated / GIB:.2f} GiB"
        return text

    def _metrics(self) -> dict[str, float]:
        metrics = self._sampler.flush() if self._sampler is not None else {}
        if self._device is not None:
            peak = torch.cuda.max_memory_allocated(self._device)
            self.torch_peak_allocated = max(self.torch_peak_allocated, peak)
            metrics["gpu/torch_peak_allocated_gib"] = peak / GIB
        return metrics

    def _shutdown(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
