"""Decoding an ``AEDModel``: strategies behind one frozen ``DecodingOptions``.

``decode(model, features, feature_segments, prompts, eot_id, options)`` runs the encoder once on the
packed batch, then a strategy: ``GreedySearch`` or ``BeamSearch`` (both over an explicit
``KVCache``: self-attention keys/values grow by one slot per step, cross-attention keys/values are
computed once from the packed encoder output), ``UncachedGreedySearch`` (the reference), or
``CtcGreedySearch`` (the encoder's CTC head, no decoder); ``BeamSearch`` also decodes jointly with
the CTC head (``DecodingOptions.ctc_weight``). Every utterance stops at its own
end-of-text or length limit. ``greedy_decode`` is the short form used by
training-time validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from speedasr.core.geometry import ENCODER_FRAME_SECONDS
from speedasr.core.segments import Segments
from speedasr.decoding.beam import BeamSearch
from speedasr.decoding.cache import KVCache
from speedasr.decoding.ctc import CtcGreedySearch
from speedasr.decoding.greedy import GreedySearch, UncachedGreedySearch
from speedasr.decoding.options import GUARD_SLACK, TOKENS_PER_SECOND_GUARD, DecodingOptions

__all__ = [
    "BeamSearch", "CtcGreedySearch", "DecodingOptions", "GreedySearch", "KVCache",
    "UncachedGreedySearch", "decode", "decode_encoded", "greedy_decode", "length_limits",
    "strategy_for",
]  # fmt: skip

Strategy = GreedySearch | BeamSearch | UncachedGreedySearch | CtcGreedySearch


def strategy_for(options: DecodingOptions) -> Strategy:
    """The search ``options`` ask for."""
    if options.method == "ctc":
        return CtcGreedySearch(options)
    if options.beam_size > 1 or options.ctc_weight > 0:
        return BeamSearch(options)
    return GreedySearch(options) if options.use_cache else UncachedGreedySearch(options)


def length_limits(
    enc_segments: Segments, options: DecodingOptions, max_new_tokens: Sequence[int] | None = None
) -> torch.Tensor:
    """``(B,)`` most tokens per utterance: ``max_new_tokens`` if given (capped by
    ``options.max_len``), else ``options.max_len``, else the per-second guard of each utterance."""
    if max_new_tokens is not None:
        if len(max_new_tokens) != enc_segments.batch_size:
            raise ValueError(
                f"{len(max_new_tokens)} length limits for {enc_segments.batch_size} utterances"
            )
        if any(n < 0 for n in max_new_tokens):
            raise ValueError("max_new_tokens must be >= 0")
        cap = options.max_len if options.max_len is not None else max(max_new_tokens, default=0)
        limits = [min(n, cap) for n in max_new_tokens]
    elif options.max_len is not None:
        limits = [options.max_len] * enc_segments.batch_size
    else:
        per_frame = TOKENS_PER_SECOND_GUARD * ENCODER_FRAME_SECONDS
        limits = [GUARD_SLACK + int(per_frame * n) for n in enc_segments.lengths]
    return torch.tensor(limits, dtype=torch.long)


@torch.no_grad()
def decode_encoded(
    model, enc: torch.Tensor, enc_segments: Segments, prompts: Sequence[Sequence[int]],
    eot_id: int, options: DecodingOptions | None = None,
    max_new_tokens: Sequence[int] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Decode an already encoded packed batch ``enc: (ΣT', D)`` (see ``decode``)."""
    prompts = [list(p) for p in prompts]
    if len(prompts) != enc_segments.batch_size:
        raise ValueError(f"{len(prompts)} prompts for {enc_segments.batch_size} utterances")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <|startoftranscript|>)")
    if not prompts:
        return []
    options = options or DecodingOptions()
    limits = length_limits(enc_segments, options, max_new_tokens)
    positions = getattr(getattr(model, "cfg", None), "max_decoder_positions", None)
    if positions is not None:  # the model's position table ends there (NeMo's stops decoding)
        room = torch.tensor([max(positions - len(p), 0) for p in prompts], dtype=limits.dtype)
        limits = torch.minimum(limits, room)
    return strategy_for(options).search(model, enc, enc_segments, prompts, eot_id, limits)


@torch.no_grad()
def decode(
    model, features: torch.Tensor, feature_segments: Segments, prompts: Sequence[Sequence[int]],
    eot_id: int, options: DecodingOptions | None = None,
    max_new_tokens: Sequence[int] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Transcribe a packed batch.

    Args:
        model: an ``AEDModel`` in eval mode (``encode`` + ``decoder``).
        features: ``(ΣT, n_mels)`` packed features described by ``feature_segments``.
        prompts: decoder prompt ids per utterance (e.g. ``Tokenizer.prompt("en")``), non-empty.
        eot_id: end-of-text id; an utterance stops when it is chosen (unless ``ignore_eot``).
        options: the search (``DecodingOptions``; default: greedy with KV cache).
        max_new_tokens: optional per-utterance limits (benchmarks force reference lengths).

    Returns:
        Generated ids per utterance, in batch order, without the prompt and end-of-text.
    """
    if len(prompts) != feature_segments.batch_size:
        raise ValueError(f"{len(prompts)} prompts for {feature_segments.batch_size} utterances")
    enc, enc_segments = model.encode(features, feature_segments)
    return decode_encoded(model, enc, enc_segments, prompts, eot_id, options, max_new_tokens)


def greedy_decode(
    model, features: torch.Tensor, feature_segments: Segments, prompts: Sequence[Sequence[int]],
    eot_id: int, max_len: int,
) -> list[list[int]]:  # fmt: skip
    """Greedy transcripts (KV cache) of at most ``max_len`` tokens each; see ``decode``."""
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    return decode(
        model, features, feature_segments, prompts, eot_id, DecodingOptions(max_len=max_len)
    )
