"""BatchNorm over the real frames of a packed or padded batch (NeMo's conformer conv-module norm).

BatchNorm in **training** mode breaks speedasr's rule that no utterance affects another: the
statistics it normalises with are a mean and variance over every real frame of the batch, so one
utterance's output depends on the others in its batch and, under data parallelism, on the other
ranks' batches. Everything else keeps the rule. In eval mode, and with ``frozen=True``, it
normalises with the running statistics: a per-channel affine map of each frame, and packed ≡
padded ≡ alone again.

Statistics cover real frames only: a packed batch has no other rows, and a padded batch is masked.
That is cleaner than NeMo, whose ``BatchNorm1d`` also counts the padding frames of a padded batch,
so training statistics differ from NeMo's whenever NeMo's batch had padding; eval outputs match.
Running statistics follow ``torch.nn.BatchNorm1d`` exactly: ``running = (1 - momentum) · running +
momentum · batch`` with the *unbiased* batch variance (the biased one normalises),
``momentum=None`` is the cumulative average, ``num_batches_tracked`` counts the updates.

**Across data-parallel ranks** (``torch.distributed`` initialised with world size > 1, training,
not frozen) the statistics are those of the global batch, as NeMo's ``sync_batchnorm`` makes them:
one all-reduce of ``[count, Σx, Σx²]`` (float64, from each rank's two-pass mean and variance, so
no cancellation in float32) in the forward, one of ``[Σdy, Σdy·x̂]`` in the backward (the
gradient of the global mean and variance w.r.t. each rank's frames, as ``torch.nn.SyncBatchNorm``).
Every rank then normalises with the same numbers and keeps the same running statistics, and the
result equals one process running the concatenation of all ranks' batches. A rank with no real
frame still takes part in both (``take_part_without_frames`` where it skips the model). They
run on a process group of their own (``statistics_group``), apart from DDP's and FSDP's gradient
all-reduces. ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
(Lightning's ``sync_batchnorm``) must not be used: it swaps this layer for torch's unmasked one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
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
    train. Padded outputs are zero past each length. In training under ``torch.distributed``
    (world size > 1) the statistics are the global batch's (module docstring).
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
        rows = x if layout.packed else x[layout.mask]  # (n, C): real frames only
        if data_parallel():
            y = self._across_ranks(rows)
        else:
            n = x.shape[0] if layout.packed else layout.segments.total
            if n == 0:
                return self._running(x)
            if n == 1:
                raise ValueError(
                    "conv_norm='batch' in training mode needs more than one real encoder frame "
                    "per batch (a variance of one frame is undefined, as in torch's BatchNorm1d); "
                    "got 1"
                )
            y = F.batch_norm(
                rows, self.running_mean, self.running_var, self.weight, self.bias, True,
                float(self._factor()), self.eps,
            )  # fmt: skip
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
        if layout.packed:
            return y
        return x.new_zeros(x.shape).index_put((layout.mask,), y)

    def _factor(self) -> float | torch.Tensor:
        """Weight of this batch in the running statistics (a float64 tensor for the cumulative
        average, ``momentum=None``, as in torch: reading the count would synchronise)."""
        if self.momentum is None:
            return 1.0 / (self.num_batches_tracked.double() + 1)
        return self.momentum

    def _across_ranks(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows: (n, C)``, n ≥ 0 -> normalised with the global batch's statistics; updates the
        running statistics with them. No host synchronisation: a global batch of 0 or 1 frames
        (no variance) leaves the running statistics and ``num_batches_tracked`` as they were,
        on every rank alike (a lone frame normalises to ``bias``)."""
        count, mean, var = global_moments(rows)
        dtype = compute_dtype(rows)
        invstd = torch.rsqrt(var + self.eps).to(dtype)
        y = _GlobalBatchNorm.apply(rows, self.weight, self.bias, mean.to(dtype), invstd, count)
        with torch.no_grad():
            update = count > 1
            factor = self._factor()
            unbiased = var * count / (count - 1).clamp(min=1)
            for buffer, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                new = buffer.double().lerp(batch, factor).to(buffer.dtype)
                buffer.copy_(torch.where(update, new, buffer))
            self.num_batches_tracked.add_(update.to(self.num_batches_tracked.dtype))
        return y

    def _running(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise with the running statistics: each frame alone, any leading shape."""
        y = F.batch_norm(
            x.reshape(-1, x.shape[-1]), self.running_mean, self.running_var, self.weight,
            self.bias, False, 0.0, self.eps,
        )  # fmt: skip
        return y.view_as(x)


def data_parallel() -> bool:
    """Whether batch statistics are shared across ranks: ``torch.distributed`` initialised with
    more than one process (DDP, FSDP: every rank is a data-parallel replica)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_GROUP: list = []  # [(default group, its copy for the statistics)]


def statistics_group() -> dist.ProcessGroup:
    """All ranks, in a process group of their own, made at the first use (every rank's first
    training forward, together). DDP's gradient all-reduces (and FSDP's) run during the backward
    on the default group, each started when its bucket of gradients is ready; a rank with an
    empty batch (``take_part_without_frames``) reaches BatchNorm's collectives at other points
    between them than the others do. On one group that pairs a gradient bucket of one rank with
    BatchNorm's sums of another; on two groups each keeps its own order."""
    world = dist.distributed_c10d._get_default_group()
    if not _GROUP or _GROUP[0][0] is not world:  # first use, or a new default group
        _GROUP[:] = [(world, dist.new_group())]
    return _GROUP[0][1]


def compute_dtype(rows: torch.Tensor) -> torch.dtype:
    """float32 for half-precision frames (autocast), else their own dtype."""
    return torch.promote_types(rows.dtype, torch.float32)


def global_moments(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real-frame count ``()``, mean ``(C,)`` and biased variance ``(C,)`` over every rank's
    ``rows: (n, C)``, all float64, from one all-reduce. Each rank sends ``n``, ``n·mean`` and
    ``n·(var + mean²)`` of its own frames (two-pass, so float32 frames with a large mean lose
    nothing); ranks without frames send zeros. An empty global batch gives mean 0, variance 0."""
    c = rows.shape[-1]
    with torch.no_grad():
        packed = torch.zeros(1 + 2 * c, dtype=torch.float64, device=rows.device)
        n = rows.shape[0]
        if n > 0:
            var, mean = torch.var_mean(rows.to(compute_dtype(rows)), dim=0, correction=0)
            mean, var = mean.double(), var.double()
            packed[0] = n
            packed[1 : 1 + c] = n * mean
            packed[1 + c :] = n * (var + mean * mean)
        dist.all_reduce(packed, group=statistics_group())
        count = packed[0]
        total, squares = (packed[1:] / count.clamp(min=1)).split(c)
        return count, total, (squares - total * total).clamp(min=0)


class _GlobalBatchNorm(torch.autograd.Function):
    """``y = (rows - mean) · invstd · weight + bias`` where ``mean`` and ``invstd`` are the
    global batch's: the backward includes their dependence on every rank's rows (one
    all-reduce of the per-channel ``Σdy`` and ``Σdy·x̂``). ``weight``/``bias`` get this rank's
    share; the data-parallel gradient reduction sums the shares."""

    @staticmethod
    def forward(ctx, rows, weight, bias, mean, invstd, count):
        ctx.save_for_backward(rows, weight, mean, invstd, count)
        xhat = (rows.to(mean.dtype) - mean) * invstd
        return (xhat * weight + bias).to(rows.dtype)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, mean, invstd, count = ctx.saved_tensors
        dy = dy.to(mean.dtype)
        xhat = (rows.to(mean.dtype) - mean) * invstd
        sum_dy, sum_dy_xhat = dy.sum(0), (dy * xhat).sum(0)
        grad_rows = None
        if ctx.needs_input_grad[0]:  # the same on every rank: one model, one autograd graph
            # float64 on the wire, like the forward's: the same message whatever each rank's
            # dtype (a rank without frames builds its empty input in the weights' dtype)
            sums = torch.cat([sum_dy, sum_dy_xhat]).double()
            dist.all_reduce(sums, group=statistics_group())
            mean_dy, mean_dy_xhat = (sums / count.clamp(min=1)).to(dy.dtype).chunk(2)
            grad_rows = ((dy - mean_dy - xhat * mean_dy_xhat) * (invstd * weight)).to(rows.dtype)
        grad_weight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias, None, None, None


def take_part_without_frames(module: nn.Module) -> torch.Tensor:
    """A rank that skips the model's forward (an empty batch) while the others run it calls this
    instead, so that every training-mode ``FrameBatchNorm`` of ``module`` still joins the
    collectives of the others' forward and, through the returned zero scalar (add it to the
    loss), of their backward, in the same order. Returns a plain zero where nothing is shared.

    The layers run in registration order, which is the forward order of speedasr's encoder;
    each one's empty input hangs off the previous one's output, so the backward visits them in
    reverse, as the real graph does."""
    layers = [
        m for m in module.modules() if isinstance(m, FrameBatchNorm) and m.training and not m.frozen
    ]
    if not layers or not data_parallel():
        return torch.zeros(())
    weight = layers[0].weight
    link = weight.new_zeros((), requires_grad=torch.is_grad_enabled())
    for bn in layers:
        rows = link + bn.weight.new_zeros(0, bn.num_features)
        link = bn._across_ranks(rows).sum()
    return link
