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
    from speedasr.prep.sentences import SentenceGenerator

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
    from speedasr.core.geometry import SAMPLE_RATE
    from speedasr.prep.corpus import ACCENTS, VARIANTS, UtterancePlan, speak

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
    raises; see `speedasr.data.manifests.metadata_only_cut`."""
    from lhotse import CutSet

    from speedasr.data.manifests import metadata_only_cut
    from speedasr.prep.sentences import SentenceGenerator

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


# Sampling rates, channel counts and formats of the good cuts of `make_bad_input_cuts` that are
# not 16 kHz mono: every command must resample / downmix them, never drop them.
OTHER_RATE_AUDIO = ((8000, 1, "wav"), (22050, 2, "flac"), (48000, 2, "ogg"))
LONG_CUT_SECONDS = 3.0
"""Duration of the over-long cut of `make_bad_input_cuts`: rejected when max_duration < 3 s."""


def make_bad_input_cuts(out_dir: str | Path, n_good: int = 4, seed: int = 0):
    """A corpus holding one cut of each bad-input class after good ones, written to
    ``out_dir/cuts.jsonl.gz`` (audio under ``out_dir/audio/``). Returns ``(cuts, expected)``.

    Good: `n_good` 16 kHz mono tone cuts (0.5-1.5 s) and one cut per `OTHER_RATE_AUDIO` entry
    (8 kHz WAV, 22.05 kHz stereo FLAC, 48 kHz stereo OGG), all with texts. Bad, with the reason
    ``validate_cuts(check_audio="full", max_duration=2.0)`` gives each (``expected``: cut id ->
    reason): missing file, corrupt file, zero-length file, empty text, NaN samples, over-long
    (`LONG_CUT_SECONDS`), sampling rate mismatch (8 kHz file, manifest 16 kHz), duplicate id,
    and a ``command`` source (a shell command that would create ``out_dir/EXECUTED``).
    """
    import soundfile as sf
    from lhotse import CutSet

    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = iter(tiny_texts(n_good + len(OTHER_RATE_AUDIO) + 8, seed))

    def write(name: str, audio: np.ndarray, sampling_rate: int, **kwargs) -> Path:
        path = audio_dir / name
        sf.write(path, audio, sampling_rate, **kwargs)
        return path

    def tone(seconds: float, sampling_rate: int, channels: int = 1) -> np.ndarray:
        mono = _tone_audio(rng, seconds, sampling_rate)
        return mono if channels == 1 else np.stack([mono, 0.5 * mono], axis=1)

    good = [
        _file_cut(f"good-{i}", write(f"good-{i}.wav", tone(rng.uniform(0.5, 1.5), 16000), 16000),
                  next(texts))
        for i in range(n_good)
    ]  # fmt: skip
    for rate, channels, fmt in OTHER_RATE_AUDIO:
        path = write(f"rate{rate}.{fmt}", tone(1.0, rate, channels), rate)
        good.append(_file_cut(f"rate{rate}-{channels}ch", path, next(texts)))
    bad = {
        "missing_audio": _file_cut("missing", audio_dir / "nope.wav", next(texts), 16000, 16000),
        "corrupt_audio": _corrupt_cut(audio_dir / "corrupt.flac", next(texts)),
        "bad_duration": _file_cut(
            "zero-length", write("zero.wav", np.zeros(0, np.float32), 16000), next(texts)
        ),
        "empty_text": _file_cut("empty-text", write("empty.wav", tone(1.0, 16000), 16000), " "),
        "too_long": _file_cut(
            "long", write("long.wav", tone(LONG_CUT_SECONDS, 16000), 16000), next(texts)
        ),
        "header_mismatch": _file_cut(
            "rate-mismatch", write("rate8k.wav", tone(1.0, 8000), 8000), next(texts), 16000, 16000
        ),
        "non_finite_samples": _file_cut(
            "nan",
            write("nan.wav", _with_nan(tone(1.0, 16000)), 16000, subtype="FLOAT"),
            next(texts),
        ),  # fmt: skip
        "duplicate_id": good[0],
        "command_source": _file_cut(
            "command",
            f"touch {out_dir / 'EXECUTED'}; cat {good[0].recording.sources[0].source}",
            next(texts),
            16000,
            good[0].recording.num_samples,
            source_type="command",
        ),  # fmt: skip
    }
    cuts = CutSet.from_cuts(good + list(bad.values()))
    cuts.to_file(out_dir / "cuts.jsonl.gz")
    return cuts, {cut.id: reason for reason, cut in bad.items()}


def _file_cut(
    cut_id: str, path: str | Path, text: str, sampling_rate: int | None = None,
    num_samples: int | None = None, source_type: str = "file",
):  # fmt: skip
    """A cut over all of `path` with one English supervision. With `sampling_rate` and
    `num_samples` the recording is described by them instead of the file's header (a manifest
    that disagrees with its file, a file that does not exist, a command source)."""
    from lhotse import AudioSource, Recording, SupervisionSegment

    if sampling_rate is None:
        recording = Recording.from_file(path, recording_id=cut_id)
    else:
        source = AudioSource(type=source_type, channels=[0], source=str(path))
        recording = Recording(
            id=cut_id, sources=[source], sampling_rate=sampling_rate, num_samples=num_samples,
            duration=num_samples / sampling_rate,
        )  # fmt: skip
    cut = recording.to_cut()
    cut.supervisions = [
        SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=cut.duration,
                           channel=cut.channel, text=text, language="en")
    ]  # fmt: skip
    return cut


def _corrupt_cut(path: Path, text: str):
    """A cut over a FLAC file whose bytes after the magic number are garbage."""
    path.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    return _file_cut("corrupt", path, text, 16000, 16000)


def _with_nan(audio: np.ndarray) -> np.ndarray:
    audio = audio.copy()
    audio[len(audio) // 2] = np.nan
    return audio


def write_untrained_checkpoint(out_dir: str | Path, seed: int = 0, **config) -> Path:
    """``out_dir/untrained.ckpt``: a speedasr checkpoint of a tiny untrained model (random
    weights from ``seed``; ``ModelConfig`` fields overridden by ``config``) with a 96-token
    tokenizer trained on ``tiny_texts``, loadable by ``speedasr.load`` and every ``--ckpt``
    command. Its transcripts are noise, but every decoding path must still agree on them."""
    from dataclasses import asdict

    import torch

    from speedasr.data.tokenizer import Tokenizer
    from speedasr.models.aed import AEDModel, ModelConfig

    out_dir = Path(out_dir)
    tokenizer = Tokenizer.train(tiny_texts(40, seed=1), out_dir / "tokenizer", vocab_size=96)
    settings = dict(
        vocab_size=96, pad_id=tokenizer.pad_id, d_model=32, encoder_layers=1, encoder_heads=2,
        decoder_layers=1, subsampling_channels=8, dropout=0.0, attention_backend="torch",
    )  # fmt: skip
    model_config = ModelConfig(**{**settings, **config})
    torch.manual_seed(seed)
    model = AEDModel(model_config)
    path = out_dir / "untrained.ckpt"
    torch.save({
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": asdict(model_config)}, "tokenizer": tokenizer.to_state(),
    }, path)  # fmt: skip
    return path
