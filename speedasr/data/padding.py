"""Padding accounting, in one place: used by the padding benchmark, the profiler callbacks and the
training logs.

Everything is counted from per-utterance lengths, so it needs no tensors and works on metadata
alone. A batch costs what its layout computes: a padded batch computes ``B × max`` positions on
every axis, a packed batch computes exactly the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from speedasr.core.geometry import encoder_length


@dataclass
class PaddingStats:
    """Real vs computed positions of one batch or of many (stats add up with ``+``).

    ``*_real`` counts what the utterances contain, ``*_computed`` what the batch layout makes the
    model compute. Attention terms count query×key score entries (a proxy for attention FLOPs that
    is exact up to a constant per axis): encoder self ``T_enc²``, decoder self ``L²``, cross
    ``L × T_enc``.
    """

    frames_real: int = 0
    frames_computed: int = 0
    encoder_frames_real: int = 0
    encoder_frames_computed: int = 0
    tokens_real: int = 0
    tokens_computed: int = 0
    attn_encoder_real: int = 0
    attn_encoder_computed: int = 0
    attn_decoder_real: int = 0
    attn_decoder_computed: int = 0
    attn_cross_real: int = 0
    attn_cross_computed: int = 0
    batches: int = 0
    utterances: int = 0

    def __add__(self, other: PaddingStats) -> PaddingStats:
        return PaddingStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def attention_real(self) -> int:
        return self.attn_encoder_real + self.attn_decoder_real + self.attn_cross_real

    @property
    def attention_computed(self) -> int:
        return self.attn_encoder_computed + self.attn_decoder_computed + self.attn_cross_computed

    def fractions(self) -> dict[str, float]:
        """Padding fraction (0-1) per axis: ``1 - real / computed`` (0 when nothing computed)."""

        def frac(real: int, computed: int) -> float:
            return 0.0 if computed == 0 else 1.0 - real / computed

        return {
            "padding_frames": frac(self.frames_real, self.frames_computed),
            "padding_encoder_frames": frac(self.encoder_frames_real, self.encoder_frames_computed),
            "padding_tokens": frac(self.tokens_real, self.tokens_computed),
            "padding_attention": frac(self.attention_real, self.attention_computed),
            "padding_attention_encoder": frac(self.attn_encoder_real, self.attn_encoder_computed),
            "padding_attention_decoder": frac(self.attn_decoder_real, self.attn_decoder_computed),
            "padding_attention_cross": frac(self.attn_cross_real, self.attn_cross_computed),
        }


def batch_padding(
    frames: Sequence[int],
    tokens: Sequence[int],
    packed: bool,
    encoder_frames: Sequence[int] | None = None,
) -> PaddingStats:
    """Padding stats of one batch from per-utterance lengths.

    Args:
        frames: input feature frames per utterance.
        tokens: decoder tokens per utterance (prompt + text).
        packed: True for a packed batch (computes only real positions), False for a padded one.
        encoder_frames: encoder frames per utterance; default ``encoder_length(frames)``.
    """
    if len(frames) != len(tokens):
        raise ValueError(f"{len(frames)} frame lengths but {len(tokens)} token lengths")
    enc = (
        list(encoder_frames) if encoder_frames is not None else [encoder_length(t) for t in frames]
    )
    b = len(frames)
    real = dict(
        frames_real=sum(frames),
        encoder_frames_real=sum(enc),
        tokens_real=sum(tokens),
        attn_encoder_real=sum(t * t for t in enc),
        attn_decoder_real=sum(n * n for n in tokens),
        attn_cross_real=sum(n * t for n, t in zip(tokens, enc, strict=False)),
    )
    if packed:
        computed = {k.replace("_real", "_computed"): v for k, v in real.items()}
    else:
        t_max, e_max, l_max = max(frames, default=0), max(enc, default=0), max(tokens, default=0)
        computed = dict(
            frames_computed=b * t_max,
            encoder_frames_computed=b * e_max,
            tokens_computed=b * l_max,
            attn_encoder_computed=b * e_max * e_max,
            attn_decoder_computed=b * l_max * l_max,
            attn_cross_computed=b * l_max * e_max,
        )
    return PaddingStats(**real, **computed, batches=1, utterances=b)
