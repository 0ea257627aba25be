"""What to decode and how: one frozen options object, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TOKENS_PER_SECOND_GUARD = 10.0
"""Default length guard: at most 10 tokens per second of audio (+ ``GUARD_SLACK``); BPE speech
runs at 2-5 tokens/s, so only a looping hypothesis ever reaches it."""
GUARD_SLACK = 8


@dataclass(frozen=True)
class DecodingOptions:
    """How ``speedasr.decoding.decode`` searches. Invalid combinations raise ``ValueError``."""

    method: Literal["attention", "ctc"] = "attention"
    """``attention``: the decoder (greedy or beam search); ``ctc``: greedy best path of the
    encoder's CTC head (models trained with ``ctc_weight > 0``; no decoder, no beam)."""
    beam_size: int = 1
    """Hypotheses kept per utterance; 1 is greedy search (and beam search of size 1 equals it)."""
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by ``logprob / length ** length_penalty`` (length in
    tokens, end-of-text included): 1 is the mean log-probability per token, 0 the raw sum."""
    max_len: int | None = None
    """Most tokens emitted per utterance (end-of-text not counted). None: a per-utterance guard,
    ``GUARD_SLACK + TOKENS_PER_SECOND_GUARD * audio seconds`` (from the encoder length, so it does
    not depend on the rest of the batch)."""
    use_cache: bool = True
    """Incremental decoding with a KV cache; False re-runs the decoder over the whole prefix at
    every step (the reference implementation, quadratic in output length; greedy only)."""
    ctc_weight: float = 0.0
    """Joint CTC/attention decoding (``method="attention"``, models with a CTC head): weight λ
    of the CTC prefix log-probability against ``1 - λ`` for the decoder's (``BeamSearch``); it
    keeps the decoder from repeating or skipping stretches of long utterances. 0: decoder only."""
    ignore_eot: bool = False
    """Never stop at end-of-text: emit exactly the length limit (benchmarks of untrained weights
    force the reference length this way, so every architecture emits the same number of tokens)."""

    def __post_init__(self) -> None:
        if self.method not in ("attention", "ctc"):
            raise ValueError(f"method must be 'attention' or 'ctc', got {self.method!r}")
        if self.method == "ctc" and self.beam_size > 1:
            raise ValueError("beam_size > 1 is for method='attention'; CTC decoding is greedy")
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight must be in [0, 1], got {self.ctc_weight}")
        if self.method == "ctc" and self.ctc_weight > 0:
            raise ValueError("ctc_weight is for method='attention' (joint decoding)")
        if not self.use_cache and self.ctc_weight > 0:
            raise ValueError(
                "ctc_weight > 0 conflicts with use_cache=False (joint decoding is a "
                "beam search over the KV cache)"
            )
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len is not None and self.max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {self.max_len}")
        if self.length_penalty < 0:
            raise ValueError(f"length_penalty must be >= 0, got {self.length_penalty}")
        if not self.use_cache and self.beam_size > 1:
            raise ValueError(
                "beam_size > 1 conflicts with use_cache=False: beam search needs the KV cache"
            )
