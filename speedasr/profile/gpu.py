"""GPU utilization and memory sampling: an NVML source, a background sampler, and the aggregation
between logging steps.

The source is any zero-argument callable returning a ``GPUSample``, so the aggregation and the
thread are tested on CPU with a fake source; ``NvmlSource`` is the real one (nvidia-ml-py).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from speedasr.core.geometry import GIB


@dataclass(frozen=True)
class GPUSample:
    """One reading of one GPU.

    Attributes:
        utilization: percent (0-100) of the last sample period during which at least one kernel
            was running (NVML's "GPU utilization"; it is kernel-busy time, not SM occupancy).
        memory_used: bytes of device memory in use (all processes, incl. the caching allocator).
        memory_total: bytes of device memory.
    """

    utilization: float
    memory_used: int
    memory_total: int


GPUSampleSource = Callable[[], GPUSample]


class NvmlSource:
    """Reads one GPU through NVML (nvidia-ml-py: ``pip install 'speedasr[gpu]'``). Raises if NVML
    is unavailable."""

    def __init__(self, cuda_index: int) -> None:
        from speedasr.extras import require  # nvidia-ml-py: only where NVML is read

        pynvml = require("pynvml", "GPU monitoring through NVML")
        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(cuda_index))
            self.name = str(pynvml.nvmlDeviceGetName(self._handle))
        except Exception:
            pynvml.nvmlShutdown()
            raise

    def __call__(self) -> GPUSample:
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return GPUSample(utilization=float(util.gpu), memory_used=mem.used, memory_total=mem.total)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _nvml_index(cuda_index: int) -> int:
    """NVML enumerates all GPUs; CUDA only the visible ones (``CUDA_VISIBLE_DEVICES``) in its order.

    torch knows the mapping (by UUID or index); use it when available, else assume they agree.
    """
    import torch

    try:
        return int(torch.cuda._get_nvml_device_index(cuda_index))
    except Exception:
        return cuda_index


class UtilizationWindow:
    """Aggregates samples between logging steps (``flush``) and over the whole run (``totals``)."""

    def __init__(self) -> None:
        self._reset_interval()
        self.samples = 0
        self.utilization_sum = 0.0
        self.memory_peak = 0

    def _reset_interval(self) -> None:
        self._n = 0
        self._util_sum = 0.0
        self._util_min = math.inf
        self._mem_sum = 0
        self._mem_peak = 0

    def add(self, sample: GPUSample) -> None:
        self._n += 1
        self._util_sum += sample.utilization
        self._util_min = min(self._util_min, sample.utilization)
        self._mem_sum += sample.memory_used
        self._mem_peak = max(self._mem_peak, sample.memory_used)
        self.samples += 1
        self.utilization_sum += sample.utilization
        self.memory_peak = max(self.memory_peak, sample.memory_used)

    def flush(self) -> dict[str, float]:
        """Metrics of the samples since the last flush (empty if there were none), then reset."""
        if self._n == 0:
            return {}
        out = {
            "gpu/utilization_mean": self._util_sum / self._n,
            "gpu/utilization_min": self._util_min,
            "gpu/memory_used_gib": self._mem_sum / self._n / GIB,
            "gpu/memory_peak_gib": self._mem_peak / GIB,
            "gpu/samples": float(self._n),
        }
        self._reset_interval()
        return out

    @property
    def utilization_mean(self) -> float | None:
        return self.utilization_sum / self.samples if self.samples else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "utilization_sum": self.utilization_sum,
            "memory_peak": self.memory_peak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = int(state["samples"])
        self.utilization_sum = float(state["utilization_sum"])
        self.memory_peak = int(state["memory_peak"])


class GPUSampler:
    """Calls ``source`` every ``interval`` seconds in a daemon thread into a ``UtilizationWindow``.

    ``pause()``/``resume()`` skip sampling (e.g. during validation) without stopping the thread. A
    source that raises stops the sampling with one warning; training goes on.
    """

    def __init__(
        self, source: GPUSampleSource, interval: float, window: UtilizationWindow | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError(f"sampling interval must be > 0 seconds, got {interval}")
        self.source = source
        self.interval = interval
        self.window = window or UtilizationWindow()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="speedasr-gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 5 * self.interval))
            self._thread = None

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def flush(self) -> dict[str, float]:
        with self._lock:
            return self.window.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._paused.is_set():
                continue
            try:
                sample = self.source()
            except Exception as e:  # a monitor must never take training down
                warnings.warn(
                    f"GPU sampling failed ({e!r}); GPU utilization is no longer logged",
                    stacklevel=1,
                )
                return
            with self._lock:
                self.window.add(sample)
