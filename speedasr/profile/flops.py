"""Peak FLOP/s of a device, for model FLOPs utilization (MFU)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def compute_dtype(precision: str) -> torch.dtype:
    """Dtype of the matmuls for a Trainer precision string (``"bf16-mixed"`` -> bfloat16...)."""
    return _PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)


def peak_flops(
    device: torch.device | None,
    precision: str,
    override: float | Mapping[str, float] | None = None,
) -> tuple[float | None, str | None]:
    """Peak FLOP/s of one device: ``(value, None)``, or ``(None, why it is unknown)``.

    ``override`` is a number (used as is) or ``{device-name substring: FLOP/s}`` for GPUs missing
    from Lightning's table (``get_available_flops``, which is consulted otherwise, for the matmul
    dtype of ``precision``).
    """
    if isinstance(override, (int, float)):
        return float(override), None
    if device is None or device.type != "cuda":
        return None, f"no peak FLOP/s known for device {device}"
    name = torch.cuda.get_device_name(device)
    for key, value in (override or {}).items():
        if key.lower() in name.lower():
            return float(value), None
    from lightning_fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, compute_dtype(precision))
    if not peak:
        return None, f"no peak FLOP/s known for {name!r} at precision {precision}"
    return float(peak), None
