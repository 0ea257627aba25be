"""Batch types handed from the collator to the model.

``PackedBatch`` is the default: utterances concatenated, zero padding. ``PaddedBatch`` is the
classic layout, kept for comparison and for users whose models need padding. Both carry the same
``Segments`` descriptors (built once, in the collator), so converting between them is cheap and
exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from speedasr.core.segments import Segments

IGNORE_INDEX = -100
"""Target value of positions that carry no loss (prompt tokens, padding)."""


@dataclass
class _BatchBase:
    """Fields and device handling shared by both layouts (shapes differ: see the subclasses)."""

    features: torch.Tensor
    feature_segments: Segments
    tokens: torch.Tensor
    targets: torch.Tensor
    token_segments: Segments
    prompt_lengths: tuple[int, ...]
    cut_ids: list[str] = field(default_factory=list)
    durations: tuple[float, ...] = ()
    texts: list[str] = field(default_factory=list)
    skipped_cut_ids: tuple[str, ...] = ()
    skipped_reasons: tuple[tuple[str, str], ...] = ()

    @property
    def batch_size(self) -> int:
        return self.feature_segments.batch_size

    @property
    def audio_seconds(self) -> float:
        return float(sum(self.durations))

    def to(self, device: torch.device | str):
        return replace(
            self,
            features=self.features.to(device, non_blocking=True),
            feature_segments=self.feature_segments.to(device),
            tokens=self.tokens.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            token_segments=self.token_segments.to(device),
        )


@dataclass
class PackedBatch(_BatchBase):
    """B utterances, concatenated.

    Attributes:
        features: ``(ΣT, F)`` log-mel filterbank frames (10 ms shift).
        feature_segments: descriptor of the frames (lengths T_i in input frames).
        tokens: ``(ΣL,)`` int64 decoder inputs, ``prompt + text`` per utterance.
        targets: ``(ΣL,)`` int64 next-token targets, ``text + <|endoftext|>`` aligned to the last
            prompt position onwards; ``IGNORE_INDEX`` at the other prompt positions.
        token_segments: descriptor of the tokens (lengths L_i = prompt + text tokens).
        prompt_lengths: host ints, prompt tokens at the start of each utterance.
        cut_ids: lhotse cut ids, in batch order.
        durations: seconds of real audio per utterance.
        texts: reference transcripts (as in the supervision), for WER.
        skipped_cut_ids: cuts the sampler put in this batch whose audio failed to load; they are
            left out of the batch and reported (counted by the training loop), never lost silently.
        skipped_reasons: ``(reason, detail)`` of each skipped cut, in ``skipped_cut_ids`` order;
            reason is one of ``speedasr.data.manifests.REASONS``.
    """

    def to_padded(self, pad_id: int) -> PaddedBatch:
        fs, ts = self.feature_segments, self.token_segments
        return PaddedBatch(
            **{
                **vars(self),
                "features": fs.pad(self.features),
                "tokens": ts.pad(self.tokens, pad_id),
                "targets": ts.pad(self.targets, IGNORE_INDEX),
            }
        )


@dataclass
class PaddedBatch(_BatchBase):
    """B utterances, right-padded to the longest.

    Attributes:
        features: ``(B, T_max, F)``; frames past ``feature_segments.lengths[i]`` are zero.
        tokens: ``(B, L_max)`` int64, padded with the tokenizer's pad id.
        targets: ``(B, L_max)`` int64, ``IGNORE_INDEX`` at prompt and padding positions.
        (other fields as in ``PackedBatch``)
    """

    def to_packed(self) -> PackedBatch:
        fs, ts = self.feature_segments, self.token_segments
        return PackedBatch(
            **{
                **vars(self),
                "features": fs.unpad(self.features),
                "tokens": ts.unpad(self.tokens),
                "targets": ts.unpad(self.targets),
            }
        )


Batch = PackedBatch | PaddedBatch
