"""NemoFilterbank: its tables against the ones NeMo saved in the fixture (librosa's Slaney mel,
torch's symmetric Hann), and edge cases. Its features against NeMo's: tests/nemo."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

from speedasr.nn.filterbank import NemoFilterbank, slaney_mel_filterbank

NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"


def _nemo_state() -> dict:
    with tarfile.open(NEMO) as tar:
        data = tar.extractfile("./model_weights.ckpt").read()
    return torch.load(io.BytesIO(data), weights_only=True)


def test_tables_equal_nemos():
    state = _nemo_state()
    module = NemoFilterbank(128)
    torch.testing.assert_close(module.fb, state["preprocessor.featurizer.fb"], rtol=0, atol=1e-8)
    torch.testing.assert_close(module.window, state["preprocessor.featurizer.window"])
    # another mel count: every filter is non-empty
    fb = slaney_mel_filterbank(80, 512, 16000)
    assert fb.shape == (80, 257) and bool((fb.sum(1) > 0).all())


def test_frames_and_short_inputs():
    module = NemoFilterbank(128).eval()
    audio = torch.randn(16000)
    assert module(audio).shape == (100, 128)  # N // 160 frames, time-major
    one = module(torch.randn(200))  # one frame: NeMo's std is 0, the output finite
    assert one.shape == (1, 128) and bool(torch.isfinite(one).all())
    assert module(torch.randn(100)).shape == (0, 128)


def test_eval_is_deterministic_and_training_dithers():
    module = NemoFilterbank(128)
    audio = torch.zeros(3200)  # silence: only dither can make it vary
    module.eval()
    assert torch.equal(module(audio), module(audio))
    module.train()
    assert not torch.equal(module(audio), module(audio))


def test_dtype_casts_of_the_model_keep_the_tables_float32():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), NemoFilterbank(128))
    fb = model[1].fb.clone()
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[1].fb.dtype == torch.float32 and torch.equal(model[1].fb, fb)
    model.half().float()
    assert torch.equal(model[1].fb, fb)
