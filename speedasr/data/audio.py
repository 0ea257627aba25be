"""The audio the model hears: 16 kHz mono, from any sampling rate and channel count.

``load_model_audio`` is the one loading path of training, validation, ``eval``, ``transcribe``
and ``data validate --check-audio full``, at ``speedasr.core.geometry.SAMPLE_RATE`` (the one home of
the model's rate; synthesis and importers write and assume it too). Imports no other speedasr data
module, so the dataset and the manifest checks can both use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from speedasr.core.geometry import SAMPLE_RATE

if TYPE_CHECKING:
    from lhotse.cut import Cut


class AudioLoadError(Exception):
    """A cut's audio cannot be turned into model input. ``reason`` is one of
    ``speedasr.data.manifests.REASONS`` (``missing_audio``, ``corrupt_audio``,
    ``non_finite_samples``), ``detail`` one line for humans."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    @classmethod
    def from_exception(cls, e: Exception, reason: str = "corrupt_audio") -> AudioLoadError:
        return cls(reason, one_line(e))


def one_line(e: Exception, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters (lhotse's loading errors span
    many lines: a header, then one line per audio backend tried)."""
    message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {message}"[:limit]


def cut_recordings(cut) -> list:
    """Recordings a cut reads audio from: its own, or those of every track of a mixed cut (none
    for padding/feature-only cuts)."""
    tracks = getattr(cut, "tracks", None)
    if tracks is not None:  # MixedCut
        return [rec for track in tracks for rec in cut_recordings(track.cut)]
    recording = getattr(cut, "recording", None)
    return [recording] if recording is not None else []


def load_model_audio(cut: Cut, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``(1, samples)`` float32 audio of ``cut`` as the model hears it: at ``sampling_rate`` Hz
    and mono, whatever the file's rate and channels.

    Resampling is lhotse's (``cut.resample``: its ``Resample`` transform, which runs scipy's
    polyphase filter ``scipy.signal.resample_poly`` when torchaudio is not installed). Several
    channels are downmixed to their mean (the average of the channels, not their sum, so the
    level stays that of one channel). Raises ``AudioLoadError``: ``missing_audio`` (no recording,
    or a file source that does not exist), ``corrupt_audio`` (any resampling or decoding failure,
    e.g. a recording whose manifest duration is NaN), ``non_finite_samples`` (NaN/inf in the
    decoded samples).
    """
    recordings = cut_recordings(cut)
    if not recordings:  # lhotse would return None (or fail to resample): a feature-only cut
        raise AudioLoadError("missing_audio", "the cut has no recording")
    for recording in recordings:
        for source in recording.sources:
            if source.type == "file" and not Path(source.source).is_file():
                raise AudioLoadError("missing_audio", f"no file '{source.source}'")
    try:
        if cut.sampling_rate != sampling_rate:
            # lhotse computes the new length from the manifest here, before reading anything.
            cut = cut.resample(sampling_rate)
    except Exception as e:
        detail = f"cannot resample {cut.sampling_rate} Hz to {sampling_rate} Hz: {one_line(e)}"
        raise AudioLoadError("corrupt_audio", detail) from None
    try:
        audio = cut.load_audio()
    except Exception as e:  # lhotse wraps every backend's failure in its own error
        raise AudioLoadError.from_exception(e) from None
    audio = np.asarray(audio, dtype=np.float32).reshape(-1, audio.shape[-1])
    if audio.shape[0] > 1:
        audio = audio.mean(axis=0, keepdims=True)
    bad = int(audio.size - np.isfinite(audio).sum())
    if bad:
        raise AudioLoadError("non_finite_samples", f"{bad} NaN/inf samples")
    return audio
