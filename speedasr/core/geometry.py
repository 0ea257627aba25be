"""The numbers that tie audio, features, the encoder and the decoder together, each defined once.

Audio is 16 kHz mono; features are lhotse's fbank (25 ms window, 10 ms shift); the encoder's
convolutional subsampling has ``stages`` stride-2 convolutions (kernel 3, padding 1), 3 by default
(8x: 10 ms -> 80 ms); the decoder reads speedasr's 4-token prompt before the text. Everything
here is plain Python (no torch), so metadata-only tools (bins, bench padding, sizing) use it too.
"""

from __future__ import annotations

# --- audio and features ------------------------------------------------------------------------
SAMPLE_RATE = 16000
"""Hz of the audio the model hears (every loading path resamples to it; NeMo's front end too)."""
FRAME_SHIFT_SECONDS = 0.01
"""Feature frame shift: lhotse's default fbank (25 ms window, 10 ms shift)."""
FRAMES_PER_SECOND = round(1 / FRAME_SHIFT_SECONDS)
"""Feature frames per second of audio (100)."""
N_MELS = 80
"""Log-mel bins of lhotse's fbank in speedasr's own models (``ModelConfig.n_mels``'s default);
the Canary presets compute 128 in the model (``frontend: nemo``)."""


def num_input_frames(duration_seconds: float, frame_shift: float = FRAME_SHIFT_SECONDS) -> int:
    """Fbank frames of an utterance, as lhotse computes them (rounded, ``int(d / shift + 0.5)``)."""
    return int(duration_seconds / frame_shift + 0.5)


# --- encoder subsampling -----------------------------------------------------------------------
SUBSAMPLING_STAGES = 3
"""Three stride-2 stages (the default, FastConformer/Canary): 8x fewer frames (10 ms -> 80 ms)."""
SUBSAMPLING_FACTORS = {4: 2, 8: 3, 16: 4}
"""Subsampling factor -> stride-2 stages (NeMo's ``dw_striding`` offers the same three)."""
SUBSAMPLING_FACTOR = 2**SUBSAMPLING_STAGES
"""Feature frames per encoder frame at the default subsampling (8)."""
ENCODER_FRAME_SECONDS = FRAME_SHIFT_SECONDS * SUBSAMPLING_FACTOR
"""Seconds per encoder frame at the default subsampling (0.08: 10 ms features, 8x)."""
ENCODER_FRAMES_PER_SECOND = FRAMES_PER_SECOND / SUBSAMPLING_FACTOR
"""Encoder frames per second of audio at the default subsampling (12.5)."""


def encoder_length(num_frames: int, num_stages: int = SUBSAMPLING_STAGES) -> int:
    """Encoder frames after ``num_stages`` stride-2 convolutions (kernel 3, padding 1).

    Each stage maps T to ``floor((T + 2 - 3) / 2) + 1 = ceil(T / 2)``, so 3 stages give
    ``ceil(T / 8)`` with ceiling at every stage. Any utterance with at least one input frame keeps
    at least one encoder frame; zero frames stay zero.
    """
    for _ in range(num_stages):
        num_frames = (num_frames + 1) // 2
    return num_frames


def receptive_field(stages: int = SUBSAMPLING_STAGES) -> int:
    """Input frames one encoder frame sees through ``stages`` k3/s2 convolutions: 15 at 8x."""
    return 1 + 2 * (2**stages - 1)


SUBSAMPLING_RECEPTIVE_FIELD = receptive_field()

# --- decoder -----------------------------------------------------------------------------------
PROMPT_TOKENS = 4
"""Length of speedasr's own prompt, ``<|startoftranscript|> <|lang|> <|task|> <|pnc|>``
(``speedasr.data.tokenizer.prompt_pieces``; a test keeps the two equal): what token counts assume
where no tokenizer is known (bins without a tokenizer, ``model info``). With a tokenizer, ask it
(``prompt_length``): NeMo's canary2 prompt is 9 tokens."""

# --- units -------------------------------------------------------------------------------------
GIB = 1 << 30
"""Bytes per GiB."""
