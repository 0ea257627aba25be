"""NeMo's log-mel front end (``FilterbankFeatures``, docs/canary.md §3), one utterance at a time.

Canary models read these features, not lhotse's Kaldi fbank: pre-emphasis 0.97, a centred STFT
(n_fft 512, hop 160, a **symmetric** Hann window of 400 samples centred in 512, zero padding),
power spectrum, Slaney mel filterbank, ``log(mel + 2**-24)``, ``N // hop`` frames, and per-bin
normalisation over the utterance's frames with the **unbiased** std plus 1e-5. The window and the
filterbank are buffers, so a checkpoint imported from a ``.nemo`` carries NeMo's own tensors
(``preprocessor.featurizer.window`` / ``fb``); the values built here are the same formulas.

Every utterance is computed alone (its statistics, its STFT padding), so packed and padded
batches of these features equal the per-utterance features exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from speedasr.core.geometry import SAMPLE_RATE

NEMO_N_FFT = 512
NEMO_WIN_LENGTH = 400
NEMO_HOP_LENGTH = 160
NEMO_PREEMPHASIS = 0.97
NEMO_LOG_GUARD = 2.0**-24
NEMO_STD_GUARD = 1e-5
NEMO_DITHER = 1e-5


def slaney_mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """``(n_mels, n_fft // 2 + 1)`` float32: librosa's ``filters.mel(norm="slaney", htk=False,
    fmin=0, fmax=sr/2)`` (Slaney's mel scale: linear below 1 kHz, logarithmic above; triangles
    normalised to unit area)."""

    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        lin = f / (200.0 / 3)
        log = 15.0 + torch.log(torch.clamp(f, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
        return torch.where(f >= 1000.0, log, lin)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        lin = m * (200.0 / 3)
        log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0))
        return torch.where(m >= 15.0, log, lin)

    dt = torch.float64
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=dt)
    # on the CPU even under torch.device("meta") (a preset built on the meta device reads it)
    top = hz_to_mel(torch.tensor(sample_rate / 2, dtype=dt, device="cpu"))
    mel_freqs = mel_to_hz(torch.linspace(0, float(top), n_mels + 2, dtype=dt))
    widths = mel_freqs.diff()
    ramps = mel_freqs[:, None] - fft_freqs[None]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    enorm = 2.0 / (mel_freqs[2:] - mel_freqs[:-2])
    return (weights * enorm[:, None]).to(torch.float32)


class NemoFilterbank(nn.Module):
    """Audio ``(N,)`` float samples at 16 kHz -> ``(N // 160, n_mels)`` normalised log-mel frames.

    Buffers (NeMo's names in a ``.nemo``): ``window (400,)`` and ``fb (1, n_mels, 257)``. In
    training mode dither (1e-5 · N(0, 1)) is added first, as NeMo does; eval adds nothing.
    """

    def __init__(self, n_mels: int = 128) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.register_buffer("window", torch.hann_window(NEMO_WIN_LENGTH, periodic=False))
        fb = slaney_mel_filterbank(n_mels, NEMO_N_FFT, SAMPLE_RATE)
        self.register_buffer("fb", fb[None])

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (torch's signature)
        """Moves follow the model (``.to(device)``), dtype casts do not: the tables stay NeMo's
        float32 values under ``model.to(torch.bfloat16)`` (bf16 inference), since a rounded
        filterbank would change the features the model was trained on."""
        device = fn(torch.zeros((), device=self.window.device)).device
        self.window = self.window.to(device)
        self.fb = self.fb.to(device)
        return self

    @staticmethod
    def num_frames(num_samples: int) -> int:
        """Feature frames of ``num_samples`` samples (NeMo's ``get_seq_len``)."""
        return num_samples // NEMO_HOP_LENGTH

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio: (N,)`` -> ``(N // 160, n_mels)`` float32 (time-major, speedasr's layout)."""
        x = audio.to(torch.float32)
        frames = self.num_frames(x.numel())
        if frames == 0:
            return x.new_zeros(0, self.n_mels)
        if self.training and NEMO_DITHER > 0:
            x = x + NEMO_DITHER * torch.randn_like(x)
        x = torch.cat((x[:1], x[1:] - NEMO_PREEMPHASIS * x[:-1]))
        spec = torch.stft(
            x, NEMO_N_FFT, hop_length=NEMO_HOP_LENGTH, win_length=NEMO_WIN_LENGTH,
            window=self.window.to(torch.float32), center=True, pad_mode="constant",
            return_complex=True,
        )  # fmt: skip
        # NeMo's order of operations (magnitude, then squared), so the rounding matches.
        power = torch.view_as_real(spec).pow(2).sum(-1).sqrt().pow(2)
        mel = torch.log(self.fb[0].to(torch.float32) @ power + NEMO_LOG_GUARD)[:, :frames]
        mean = mel.mean(1, keepdim=True)
        if frames > 1:
            std = ((mel - mean) ** 2).sum(1, keepdim=True).div(frames - 1).sqrt()
        else:  # NeMo: the NaN std of one frame becomes 0
            std = torch.zeros_like(mean)
        return ((mel - mean) / (std + NEMO_STD_GUARD)).T.contiguous()
