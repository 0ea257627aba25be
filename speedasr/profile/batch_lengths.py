"""What the profiler callbacks need to know about a batch, from any project's batch layout.

A batch adapter is a function ``batch -> BatchLengths | None``: per-example input lengths, output
lengths (``None`` when the batch has no output sequence) and whether the batch is packed. Padded
lengths come from the batch tensors when the adapter knows them, else default to the longest
example. ``default_batch_lengths`` understands speedasr's ``PackedBatch``/``PaddedBatch``,
``(x, x_lens)`` and ``(x, x_lens, y, y_lens)`` tuples, dicts with length or mask keys, ESPnet's
``(ids, dict)`` batches and icefall's (lhotse ``K2SpeechRecognitionDataset``) supervision dicts.

Padding itself is counted by ``speedasr.data.padding`` (``BatchLengths.padding_stats``); this module
only finds the lengths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from speedasr.core.batch import IGNORE_INDEX
from speedasr.core.geometry import encoder_length
from speedasr.data.padding import PaddingStats, batch_padding

Lengths = Sequence[int] | torch.Tensor
"""Per-example lengths: host ints or a 1-D integer tensor (any device)."""


@dataclass(frozen=True)
class BatchLengths:
    """Per-example lengths of one batch.

    Attributes:
        input_lengths: real input positions per example (feature frames, samples, ...).
        output_lengths: real output tokens per example (decoder input), or None when the batch has
            no output sequence (encoder-only, CTC without targets...): token axes are then absent.
        packed: True when the batch concatenates examples without padding.
        input_padded_length: time size of the padded input tensor, ``T_pad`` in ``(B, T_pad, ...)``;
            None means ``max(input_lengths)``. Ignored for packed batches.
        output_padded_length: same for the output tensor ``(B, L_pad)``.
        durations: seconds of audio per example, if known (used for audio seconds/s and the
            batch shape map).
    """

    input_lengths: Lengths
    output_lengths: Lengths | None = None
    packed: bool = False
    input_padded_length: int | None = None
    output_padded_length: int | None = None
    durations: Sequence[float] | torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.input_lengths)

    @property
    def has_outputs(self) -> bool:
        return self.output_lengths is not None

    def on_host(self) -> BatchLengths:
        """Copy with plain Python ints/floats (waits for the device if tensors are on one)."""
        return replace(
            self,
            input_lengths=_host_ints(self.input_lengths),
            output_lengths=None if self.output_lengths is None else _host_ints(self.output_lengths),
            durations=None
            if self.durations is None
            else tuple(float(d) for d in _tolist(self.durations)),
        )

    def padding_stats(self, encoder_length: Callable[[int], int] = encoder_length) -> PaddingStats:
        """Real vs computed positions of this batch (lengths must be on the host: ``on_host()``).

        Args:
            encoder_length: encoder frames of an input of T frames (default: speedasr's 8x
                subsampling); pass ``lambda t: t`` for models that do not subsample.
        """
        frames = list(self.input_lengths)
        tokens = list(self.output_lengths) if self.output_lengths is not None else [0] * len(frames)
        real = batch_padding(
            frames, tokens, packed=True, encoder_frames=[int(encoder_length(t)) for t in frames]
        )
        if self.packed:
            return real
        b = len(frames)
        t_pad = _padded(self.input_padded_length, frames, "input")
        l_pad = _padded(self.output_padded_length, tokens, "output")
        # A padded batch computes every position of its B x T_pad (x L_pad) layout, i.e. exactly the
        # real positions of B examples all of the padded length: count that layout with the same
        # accounting function rather than re-deriving the formulas here.
        layout = batch_padding(
            [t_pad] * b, [l_pad] * b, packed=True, encoder_frames=[encoder_length(t_pad)] * b
        )
        computed = {
            f.name: getattr(layout, f.name.replace("_computed", "_real"))
            for f in fields(PaddingStats)
            if f.name.endswith("_computed")
        }
        return replace(real, **computed)


def _padded(padded: int | None, lengths: Sequence[int], what: str) -> int:
    longest = max(lengths, default=0)
    if padded is None:
        return longest
    if padded < longest:
        raise ValueError(
            f"{what} padded length {padded} is shorter than the longest example {longest}"
        )
    return int(padded)


def _tolist(values: Any) -> list:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _host_ints(values: Lengths) -> tuple[int, ...]:
    return tuple(int(v) for v in _tolist(values))


# Key names tried by the default adapter, in order. Extend them by writing your own adapter.
INPUT_LENGTH_KEYS = (
    "x_lens", "x_lengths", "input_lengths", "input_lens", "feature_lengths", "feats_lens",
    "audio_lengths", "audio_lens", "speech_lengths", "src_lengths", "lengths", "lens",
)  # fmt: skip
INPUT_TENSOR_KEYS = (
    "x", "inputs", "input_features", "input_values", "features", "feats", "audio", "speech", "src",
)  # fmt: skip
OUTPUT_LENGTH_KEYS = (
    "y_lens", "y_lengths", "target_lengths", "targets_lengths", "label_lengths", "labels_lengths",
    "token_lengths", "tokens_lengths", "text_lengths", "output_lengths", "tgt_lengths",
)  # fmt: skip
OUTPUT_TENSOR_KEYS = (
    "y", "targets", "target", "tokens", "labels", "decoder_input_ids", "tgt", "text",
)  # fmt: skip


def default_batch_lengths(batch: Any) -> BatchLengths | None:
    """Lengths of common batch layouts; None when the layout is not recognized.

    Recognized (first match wins):

    - speedasr ``PackedBatch`` / ``PaddedBatch`` (host lengths: no device synchronization).
    - A tuple/list ``(x, x_lens)`` or ``(x, x_lens, y, y_lens, ...)`` with ``x: (B, T, ...)``,
      ``x_lens: (B,)`` integer, ``y: (B, L)``, ``y_lens: (B,)`` integer.
    - A dict with input lengths under one of ``INPUT_LENGTH_KEYS`` (padded size from the first of
      ``INPUT_TENSOR_KEYS``, dim 1), or a mask: ``attention_mask`` (1 = real) / ``padding_mask``
      (True = padding), ``(B, T)``. Outputs from ``OUTPUT_LENGTH_KEYS`` (padded size from
      ``OUTPUT_TENSOR_KEYS``), ``decoder_attention_mask``, or ``labels`` padded with -100.
      A ``cu_seqlens`` key marks a packed batch (input lengths are its differences);
      ``durations`` (seconds per example) is used when present.
    - ESPnet's ``(utterance ids, dict)``: the dict as above (``speech``, ``speech_lengths``,
      ``text``, ``text_lengths``).
    - icefall's ``{"inputs": (B, T, F) or (B, T), "supervisions": {...}}`` (lhotse's
      ``K2SpeechRecognitionDataset``): see ``icefall_batch_lengths``.
    """
    if hasattr(batch, "feature_segments") and hasattr(batch, "token_segments"):
        return _speedasr_batch(batch)
    if isinstance(batch, Mapping):
        if isinstance(batch.get("supervisions"), Mapping):
            return icefall_batch_lengths(batch)
        return _dict_batch(batch)
    if isinstance(batch, (tuple, list)):
        if _is_espnet(batch):
            return _dict_batch(batch[1])
        return _tuple_batch(batch)
    return None


def _is_espnet(batch: Sequence[Any]) -> bool:
    """ESPnet's collate output: ``(list of utterance ids, {name: tensor, name_lengths: ...})``."""
    return (
        len(batch) == 2
        and isinstance(batch[0], (list, tuple))
        and all(isinstance(u, str) for u in batch[0])
        and isinstance(batch[1], Mapping)
    )


def icefall_batch_lengths(batch: Mapping[str, Any]) -> BatchLengths | None:
    """Lengths of an icefall batch, as lhotse's ``K2SpeechRecognitionDataset`` collates it.

    ``batch["inputs"]``: ``(B, T, F)`` features or ``(B, T)`` samples, padded to the longest cut.
    ``batch["supervisions"]``: per supervision segment (S >= B), ``sequence_idx`` (its row in the
    batch), ``start_frame`` + ``num_frames`` (feature inputs) or ``start_sample`` +
    ``num_samples`` (audio inputs), and ``text`` (strings). A row's input length is the end of its
    last supervision (``start + num``; with one supervision per cut, as icefall's recipes cut them,
    that is the cut's length). Supervisions carry text, not token ids, so output lengths are None
    (token axes absent); wrap this function and set ``output_lengths`` from your tokenizer to
    count tokens.
    """
    sup, x = batch["supervisions"], batch.get("inputs")
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    keys = [
        k for k in (("start_frame", "num_frames"), ("start_sample", "num_samples")) if k[1] in sup
    ]
    if not keys:
        return None
    start_key, num_key = keys[0]
    num = torch.as_tensor(sup[num_key])
    ends = num + torch.as_tensor(sup[start_key], device=num.device) if start_key in sup else num
    rows = sup.get("sequence_idx")
    if rows is None:  # one supervision per row, in order
        lengths = ends
    else:
        rows = torch.as_tensor(rows, device=ends.device).long()
        # scatter keeps device tensors on the device: no synchronization (see PendingLengths)
        lengths = torch.zeros(x.shape[0], dtype=ends.dtype, device=ends.device)
        lengths = lengths.scatter_reduce(0, rows, ends, reduce="amax")
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
        return None
    return BatchLengths(input_lengths=lengths, input_padded_length=x.shape[1])


def _speedasr_batch(batch: Any) -> BatchLengths:
    packed = batch.features.dim() == 2  # PackedBatch: (ΣT, F); PaddedBatch: (B, T_max, F)
    return BatchLengths(
        input_lengths=batch.feature_segments.lengths,
        output_lengths=batch.token_segments.lengths,
        packed=packed,
        input_padded_length=None if packed else batch.features.shape[1],
        output_padded_length=None if packed else batch.tokens.shape[1],
        durations=tuple(batch.durations) or None,
    )


def _is_lengths(t: Any, batch_size: int | None = None) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.dim() == 1
        and not t.is_floating_point()
        and (batch_size is None or t.shape[0] == batch_size)
    )


def _tuple_batch(batch: Sequence[Any]) -> BatchLengths | None:
    if len(batch) < 2:
        return None
    x, x_lens = batch[0], batch[1]
    if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and _is_lengths(x_lens, x.shape[0])):
        return None
    y_lens, y_pad = None, None
    if len(batch) >= 4:
        y, maybe = batch[2], batch[3]
        if isinstance(y, torch.Tensor) and y.dim() >= 2 and _is_lengths(maybe, x.shape[0]):
            y_lens, y_pad = maybe, y.shape[1]
    return BatchLengths(
        input_lengths=x_lens,
        output_lengths=y_lens,
        input_padded_length=x.shape[1],
        output_padded_length=y_pad,
    )


def _first(batch: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((batch[k] for k in keys if k in batch), None)


def _mask_lengths(mask: torch.Tensor, true_is_real: bool) -> torch.Tensor:
    real = mask.bool() if true_is_real else ~mask.bool()
    return real.sum(dim=-1)


def _dict_batch(batch: Mapping[str, Any]) -> BatchLengths | None:
    packed = "cu_seqlens" in batch
    x_pad = None
    if packed:
        x_lens = torch.diff(torch.as_tensor(batch["cu_seqlens"]))
    else:
        x_lens = _first(batch, INPUT_LENGTH_KEYS)
        if x_lens is not None:
            x = _first(batch, INPUT_TENSOR_KEYS)
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                x_pad = x.shape[1]
        elif isinstance(batch.get("attention_mask"), torch.Tensor):
            x_lens = _mask_lengths(batch["attention_mask"], true_is_real=True)
            x_pad = batch["attention_mask"].shape[-1]
        elif isinstance(batch.get("padding_mask"), torch.Tensor):
            x_lens = _mask_lengths(batch["padding_mask"], true_is_real=False)
            x_pad = batch["padding_mask"].shape[-1]
    if x_lens is None:
        return None
    if not isinstance(x_lens, torch.Tensor):
        x_lens = torch.as_tensor(x_lens)

    y_lens, y_pad = _first(batch, OUTPUT_LENGTH_KEYS), None
    if y_lens is not None:
        y = _first(batch, OUTPUT_TENSOR_KEYS)
        if isinstance(y, torch.Tensor) and y.dim() >= 2 and not packed:
            y_pad = y.shape[1]
    elif isinstance(batch.get("decoder_attention_mask"), torch.Tensor):
        y_lens = _mask_lengths(batch["decoder_attention_mask"], true_is_real=True)
        y_pad = batch["decoder_attention_mask"].shape[-1]
    elif isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() == 2:
        # -100: Hugging Face pads labels with the same value as speedasr's IGNORE_INDEX
        y_lens = (batch["labels"] != IGNORE_INDEX).sum(dim=-1)
        y_pad = batch["labels"].shape[1]
    durations = batch.get("durations")
    return BatchLengths(
        input_lengths=x_lens,
        output_lengths=y_lens,
        packed=packed,
        input_padded_length=x_pad,
        output_padded_length=y_pad,
        durations=durations if durations is not None and len(durations) == len(x_lens) else None,
    )


def lengths_to_host_async(lengths: BatchLengths) -> tuple[BatchLengths, torch.cuda.Event | None]:
    """Start copying device tensors in ``lengths`` to the host without waiting for them.

    Reading a CUDA tensor's values (``.tolist()``) blocks the CPU until the GPU has finished all
    queued work, which would stall the training loop once per step. Instead the callbacks copy
    asynchronously, record an event, and read the values at the next logging step. Returns the
    lengths (tensors now on the CPU, possibly still being filled) and the event to wait on, or
    None when nothing was on a CUDA device.
    """
    event = None

    def to_host(t: Any) -> Any:
        nonlocal event
        if isinstance(t, torch.Tensor) and t.is_cuda:
            # non_blocking device-to-host copies land in pinned memory and complete asynchronously
            t = t.detach().to("cpu", non_blocking=True)
            event = torch.cuda.Event()
        return t

    out = replace(
        lengths,
        input_lengths=to_host(lengths.input_lengths),
        output_lengths=to_host(lengths.output_lengths),
        durations=to_host(lengths.durations),
    )
    if event is not None:
        event.record()
    return out, event


class PendingLengths:
    """Batch lengths whose device-to-host copies may still be running, in arrival order.

    ``drain(wait=False)`` returns the batches whose copies finished (never blocks), ``drain()``
    waits for all of them (at logging steps, where the callbacks synchronize anyway).
    """

    def __init__(self) -> None:
        self._items: deque[tuple[int, BatchLengths, torch.cuda.Event | None]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, step: int, lengths: BatchLengths) -> None:
        self._items.append((step, *lengths_to_host_async(lengths)))

    def drain(self, wait: bool = True) -> list[tuple[int, BatchLengths]]:
        """``(step, lengths with host ints)`` of the finished batches, oldest first."""
        out = []
        while self._items:
            step, lengths, event = self._items[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            self._items.popleft()
            out.append((step, lengths.on_host()))
        return out
