"""BatchNorm over the real frames of a packed or padded batch (NeMo's conformer conv-module norm).

BatchNorm in **training** mode breaks speedasr's rule that no utterance affects another: the
statistics it normalises with are a mean and variance over every real frame of the batch, so one
utterance's output depends on the others in its batch (and, with ``SyncBatchNorm``, on the other
ranks). Everything else keeps the rule. In eval mode, and with ``frozen=True``, it normalises with
the running statistics: a per-channel affine map of each frame, and packed ≡ padded ≡ alone again.

Statistics cover real frames only: a packed batch has no other rows, and a padded batch is masked.
That is cleaner than NeMo, whose ``BatchNorm1d`` also counts the padding frames of a padded batch,
so training statistics differ from NeMo's whenever NeMo's batch had padding; eval outputs match.
Running statistics follow ``torch.nn.BatchNorm1d`` exactly: ``running = (1 - momentum) · running +
momentum · batch`` with the *unbiased* batch variance (the biased one normalises),
``momentum=None`` is the cumulative average, ``num_batches_tracked`` counts the updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from speedasr.nn.layout import Layout


class FrameBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(channels)`` on ``x: (N, C)`` packed or ``(B, T, C)`` padded -> same shape.

    Same parameters and buffers as ``torch.nn.BatchNorm1d`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts map one to one.
    ``frozen``: always normalise with the running statistics and never update them, also in
    training mode (fine-tuning a pretrained model on small batches); ``weight`` and ``bias`` still
    train. Padded outputs are zero past each length.
    """

    def __init__(
        self, channels: int, eps: float = 1e-5, momentum: float | None = 0.1, frozen: bool = False
    ) -> None:
        super().__init__(channels, eps=eps, momentum=momentum)
        self.frozen = frozen

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen={self.frozen}"

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:  # type: ignore[override]
        if not self.training or self.frozen:
            return self._running(x)  # reads nothing of the layout (export wrappers rely on it)
        n = x.shape[0] if layout.packed else layout.segments.total
        if n == 0:
            return self._running(x)
        if n == 1:
            raise ValueError(
                "conv_norm='batch' in training mode needs more than one real encoder frame per "
                "batch (a variance of one frame is undefined, as in torch's BatchNorm1d); got 1"
            )
        rows = x if layout.packed else x[layout.mask]  # (n, C): real frames only
        if self.momentum is None:  # cumulative moving average, as in torch
            factor = 1.0 / float(self.num_batches_tracked + 1)
        else:
            factor = self.momentum
        y = F.batch_norm(
            rows, self.running_mean, self.running_var, self.weight, self.bias, True, factor,
            self.eps,
        )  # fmt: skip
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
        if layout.packed:
            return y
        return x.new_zeros(x.shape).index_put((layout.mask,), y)

    def _running(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with the running statistics: each frame alone, any leading shape."""
        y = F.batch_norm(
            x.reshape(-1, x.shape[-1]), self.running_mean, self.running_var, self.weight,
            self.bias, False, 0.0, self.eps,
        )  # fmt: skip
        return y.view_as(x)
