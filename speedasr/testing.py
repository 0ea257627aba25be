"""Tiny data for tests, shipped with the package so downstream projects can use it too.

* `make_tiny_cuts(dir, n, seed)`: a handful of short audio files (tones and noise, or eSpeak
  speech) with English texts, written as FLAC/WAV plus ``dir/cuts.jsonl.gz``.
* `make_metadata_cuts(n, seed)`: cuts with realistic durations and texts but no audio, for
  samplers, bucketing and padding benchmarks.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

import numpy as np


def tiny_texts(n: int, seed: int = 0, max_words: int = 12) -> list[str]:
    """`n` sentences from the embedded corpus grammar (lowercase, no punctuation)."""
    from speedasr.data.sentences import SentenceGenerator

    rng = random.Random(f"speedasr-testing-{seed}")
    generator = SentenceGenerator(rng)
    texts = []
    while len(texts) < n:
        words = " ".join(generator.sentence()).replace(",", "").split()
        if len(words) <= max_words:
            texts.append(" ".join(words))
    return texts


def _tone_audio(rng: np.random.Generator, duration: float, sampling_rate: int) -> np.ndarray:
    """A few tones under a smooth envelope, plus a little noise. float32 in [-1, 1]."""
    t = np.arange(round(duration * sampling_rate)) / sampling_rate
    audio = np.zeros_like(t)
    for _ in range(3):
        freq = rng.uniform(100.0, 0.4 * sampling_rate)
        audio += rng.uniform(0.05, 0.2) * np.sin(2 * math.pi * freq * t + rng.uniform(0, 6.3))
    envelope = np.sin(math.pi * t / max(duration, 1e-9)) ** 0.5
    audio = audio * envelope + rng.normal(0.0, 0.01, size=t.shape)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def make_tiny_cuts(
    out_dir: str | Path,
    n: int = 4,
    seed: int = 0,
    *,
    sampling_rate: int = 16000,
    audio_format: Literal["flac", "wav"] = "flac",
    durations: tuple[float, float] = (0.5, 2.0),
    speech: bool = False,
    language: str = "en",
):
    """Write `n` short utterances under ``out_dir/audio/`` and their cuts to
    ``out_dir/cuts.jsonl.gz``; return the CutSet.

    durations: (min, max) seconds of tone audio (ignored with `speech`, whose length follows the
    text). speech: speak the texts with eSpeak NG (16 kHz only; ~0.01 s per utterance).
    Ids are ``tiny-<seed>-<index>``; each cut has one supervision with text, language and speaker.
    """
    import soundfile as sf
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = tiny_texts(n, seed)
    cuts = []
    for i, text in enumerate(texts):
        cut_id = f"tiny-{seed}-{i:04d}"
        path = out_dir / "audio" / f"{cut_id}.{audio_format}"
        if speech:
            audio, speaker = _speak(text, seed, i, sampling_rate)
        else:
            audio, speaker = (
                _tone_audio(rng, rng.uniform(*durations), sampling_rate),
                f"tone{i % 2}",
            )
        sf.write(path, audio, sampling_rate, subtype="PCM_16")
        recording = Recording.from_file(path, recording_id=cut_id)
        supervision = SupervisionSegment(
            id=cut_id,
            recording_id=cut_id,
            start=0.0,
            duration=recording.duration,
            channel=0,
            text=text,
            language=language,
            speaker=speaker,
        )
        cut = MonoCut(
            id=cut_id,
            start=0.0,
            duration=recording.duration,
            channel=0,
            recording=recording,
            supervisions=[supervision],
        )
        cuts.append(cut)
    cutset = CutSet.from_cuts(cuts)
    cutset.to_file(out_dir / "cuts.jsonl.gz")
    return cutset


def _speak(text: str, seed: int, index: int, sampling_rate: int) -> tuple[np.ndarray, str]:
    from speedasr.data.corpus import ACCENTS, SAMPLE_RATE, VARIANTS, UtterancePlan, speak

    if sampling_rate != SAMPLE_RATE:
        raise ValueError(f"speech=True writes {SAMPLE_RATE} Hz audio, not {sampling_rate}")
    voice = f"{ACCENTS[index % len(ACCENTS)]}+{VARIANTS[(seed + index) % len(VARIANTS)]}"
    plan = UtterancePlan(
        id=f"tiny-{seed}-{index}",
        split="test",
        text=text,
        spoken=text + ".",
        voice=voice,
        rate=180,
        pitch=50,
        pitch_range=50,
        noise_seed=seed * 1000 + index,
        target_duration=0.0,
        estimated_duration=0.0,
    )
    return speak(plan), voice


def make_metadata_cuts(
    n: int = 100,
    seed: int = 0,
    *,
    median_duration: float = 6.0,
    sigma: float = 0.6,
    max_duration: float = 30.0,
    words_per_second: float = 2.8,
    language: str = "en",
):
    """`n` audio-less cuts: lognormal durations (seconds, clipped to [0.5, max_duration]) and
    texts whose word count grows with duration (about `words_per_second`). Loading their audio
    raises; see `speedasr.data.importers.metadata_only_cut`."""
    from lhotse import CutSet

    from speedasr.data.importers import metadata_only_cut
    from speedasr.data.sentences import SentenceGenerator

    rng = random.Random(f"speedasr-metadata-{seed}")
    generator = SentenceGenerator(rng)
    cuts = []
    for i in range(n):
        duration = min(max(rng.lognormvariate(math.log(median_duration), sigma), 0.5), max_duration)
        target_words = max(1, round(duration * words_per_second * rng.uniform(0.7, 1.3)))
        words: list[str] = []
        while len(words) < target_words:
            words += " ".join(generator.sentence()).replace(",", "").split()
        text = " ".join(words[:target_words])
        cuts.append(metadata_only_cut(f"meta-{seed}-{i:05d}", round(duration, 3), text, language))
    return CutSet.from_cuts(cuts)
