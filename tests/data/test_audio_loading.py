"""Audio at any sampling rate and channel count reaches the model as 16 kHz mono.

``speedasr.data.audio.load_model_audio`` is the one loading path of training, validation,
``eval``, ``transcribe`` and ``data validate --check-audio full``. The reference for each file is
the same tone generated at 16 kHz directly (never resampled): same length, same frequency, same
level, and features close to the reference's.
"""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording, SupervisionSegment

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.data.audio import AudioLoadError, load_model_audio
from speedasr.data.dataset import AsrDataset
from speedasr.data.manifests import validate_cuts
from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import tiny_texts

RATES = (8000, 22050, 32000, 44100, 48000)
FORMATS = ("wav", "flac", "ogg")
TONE_HZ = 1000.0  # below the Nyquist frequency of every rate above
SECONDS = 0.5
AMPLITUDE = 0.3
N_MELS = 80


def tone(rate: int, channels: int = 1) -> np.ndarray:
    """``(samples,)`` or ``(samples, 2)``: the tone; a second channel holds it at half level, so
    that the mean of the channels is 0.75 of the tone."""
    t = np.arange(round(SECONDS * rate)) / rate
    x = AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)
    return x if channels == 1 else np.stack([x, 0.5 * x], axis=1)


def file_cut(path, audio: np.ndarray, rate: int, text: str = "a b"):
    sf.write(path, audio, rate)
    cut = Recording.from_file(path).to_cut()
    cut.supervisions = [
        SupervisionSegment(cut.id, cut.recording_id, 0.0, cut.duration, channel=cut.channel,
                           text=text, language="en")
    ]  # fmt: skip
    return cut


@pytest.fixture(scope="module")
def reference_features() -> torch.Tensor:
    """Normalized log-mel frames of the tone generated at 16 kHz (the dataset's extractor)."""
    dataset = AsrDataset(None, n_mels=N_MELS)
    x = torch.from_numpy(dataset.extractor.extract(tone(SAMPLE_RATE)[None].astype(np.float32),
                                                   SAMPLE_RATE))  # fmt: skip
    return (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("channels", (1, 2))
@pytest.mark.parametrize("rate", RATES)
def test_any_rate_and_channel_count_loads_as_16k_mono(
    tmp_path, rate, channels, fmt, reference_features
):
    cut = file_cut(tmp_path / f"tone.{fmt}", tone(rate, channels), rate)
    audio = load_model_audio(cut)
    assert audio.shape == (1, round(SECONDS * SAMPLE_RATE)), "not 16 kHz of the same duration"
    spectrum = np.abs(np.fft.rfft(audio[0]))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / audio.shape[1]
    assert abs(peak_hz - TONE_HZ) <= SAMPLE_RATE / audio.shape[1], peak_hz
    level = AMPLITUDE / np.sqrt(2) * (1.0 if channels == 1 else 0.75)  # RMS of the channel mean
    assert audio[0].std() == pytest.approx(level, rel=0.05)

    features = AsrDataset(None, n_mels=N_MELS).features(cut)
    assert features.shape == reference_features.shape
    # Lossless formats differ only by the resampling filter; Vorbis (ogg) adds coding noise.
    tolerance = 0.15 if fmt == "ogg" else 0.05
    assert (features - reference_features).abs().mean() < tolerance


def test_downmix_is_the_mean_of_the_channels(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(4000, 2)).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")  # lossless, no resampling
    audio = load_model_audio(Recording.from_file(path).to_cut())
    np.testing.assert_allclose(audio[0], stereo.mean(axis=1), atol=1e-7)


def test_a_batch_of_mixed_rates_has_the_16k_lengths(tmp_path, reference_features):
    tok = Tokenizer.train(tiny_texts(50, seed=1), tmp_path / "tok", vocab_size=60)
    cuts = CutSet.from_cuts(
        file_cut(tmp_path / f"{rate}-{ch}.{fmt}", tone(rate, ch), rate)
        for rate, ch, fmt in [(8000, 1, "wav"), (22050, 2, "flac"), (32000, 1, "ogg"),
                              (44100, 2, "wav"), (48000, 2, "ogg"), (16000, 1, "flac")]
    )  # fmt: skip
    batch = AsrDataset(tok, n_mels=N_MELS)[cuts]
    assert batch.skipped_cut_ids == ()
    assert list(batch.feature_segments.lengths) == [reference_features.shape[0]] * len(cuts)
    assert batch.durations == pytest.approx([SECONDS] * len(cuts))


def test_load_failures_name_their_reason(tmp_path, monkeypatch):
    missing = file_cut(tmp_path / "gone.wav", tone(SAMPLE_RATE), SAMPLE_RATE)
    (tmp_path / "gone.wav").unlink()
    with pytest.raises(AudioLoadError) as e:
        load_model_audio(missing)
    assert e.value.reason == "missing_audio" and "gone.wav" in e.value.detail

    nan = tone(SAMPLE_RATE).astype(np.float32)
    nan[7] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, nan, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioLoadError) as e:
        load_model_audio(Recording.from_file(path).to_cut())
    assert e.value.reason == "non_finite_samples"

    # Without lhotse's resampling backend (scipy, as on a fresh install before this fix) an
    # 8 kHz file cannot be loaded: a named reason, never a silent skip.
    low = file_cut(tmp_path / "low.wav", tone(8000), 8000)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(AudioLoadError) as e:
        load_model_audio(low)
    assert e.value.reason == "corrupt_audio" and "scipy" in e.value.detail


def cuts_lhotse_cannot_resample(tmp_path) -> dict:
    """8 kHz cuts whose resampling fails in lhotse's ``cut.resample``, before any audio is read,
    by the reason ``data validate`` must give them."""
    from lhotse import MonoCut
    from lhotse.features import Features

    good = file_cut(tmp_path / "low.wav", tone(8000), 8000)
    # A manifest whose recording duration is NaN: lhotse computes the new length from it.
    odd_recording = replace(good.recording, duration=float("nan"))
    features = Features(
        type="fbank", num_frames=50, num_features=N_MELS, frame_shift=0.01, sampling_rate=8000,
        start=0.0, duration=SECONDS, storage_type="numpy_files", storage_path=str(tmp_path),
        storage_key="x.npy",
    )  # fmt: skip
    return {
        "corrupt_audio": replace(good, id="odd", recording=odd_recording),
        "missing_audio": MonoCut(
            "no-recording", 0.0, SECONDS, 0, features=features, supervisions=good.supervisions
        ),
    }


def test_a_cut_lhotse_cannot_resample_is_a_named_reject_not_a_traceback(tmp_path):
    cuts = cuts_lhotse_cannot_resample(tmp_path)
    for reason, cut in cuts.items():
        with pytest.raises(AudioLoadError) as e:
            load_model_audio(cut)
        assert e.value.reason == reason, e.value
    accepted, report = validate_cuts(CutSet.from_cuts(cuts.values()), check_audio="full")
    assert len(accepted) == 0
    assert {r.cut_id: r.reason for r in report.rejects} == {c.id: r for r, c in cuts.items()}
    assert "cannot resample 8000 Hz to 16000 Hz" in report.rejects[0].detail


def test_audio_module_imports_neither_dataset_nor_manifests_and_is_the_one_sample_rate():
    # The dataset and the manifest checks both load audio through speedasr.data.audio; an import
    # of either from it would be a cycle. Synthesis and importers write/assume its rate, the one of
    # speedasr.core.geometry: the same object, not another 16000 (int identity, since ints above
    # 256 are not shared by Python).
    code = (
        "import sys, speedasr.data.audio as audio\n"
        "loaded = {'speedasr.data.dataset', 'speedasr.data.manifests'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
        "import speedasr.prep.corpus as corpus, speedasr.prep.importers as importers\n"
        "from speedasr.core.geometry import SAMPLE_RATE\n"
        "assert corpus.SAMPLE_RATE is importers.SAMPLE_RATE is audio.SAMPLE_RATE is SAMPLE_RATE\n"
        "assert SAMPLE_RATE == 16000\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
