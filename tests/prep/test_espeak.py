"""speedasr.prep.espeak.resample: output length, edge-case lengths, and a sine's shape."""

import math
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from speedasr.prep.espeak import resample

RATE_PAIRS = [(22050, 16000), (44100, 16000), (48000, 16000), (32000, 16000), (8000, 16000),
              (16000, 22050)]  # fmt: skip
PRIME_LENGTHS = [1009, 2003, 4999]


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: the empty-input bug was an endless loop."""

    def expire(signum, frame):
        raise TimeoutError(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
def test_empty_input_gives_empty_output(from_rate, to_rate):
    with time_limit(5):
        out = resample(np.zeros(0, dtype=np.float32), from_rate, to_rate)
    assert out.dtype == np.float32 and out.shape == (0,)


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 13, *PRIME_LENGTHS])
def test_output_length_is_ceil_of_length_times_rate_ratio(n, from_rate, to_rate):
    with time_limit(5):
        out = resample(np.random.default_rng(n).standard_normal(n), from_rate, to_rate)
    assert len(out) == math.ceil(n * to_rate / from_rate)
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize(("from_rate", "to_rate"), [(8000, 16000), (16000, 48000)])
@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_samples_of_a_constant_stay_constant(n, from_rate, to_rate):
    # An integer up-sampling factor needs no zero padding, and the constant is the DC bin only.
    out = resample(np.full(n, 0.5), from_rate, to_rate)
    np.testing.assert_allclose(out, np.full(n * to_rate // from_rate, 0.5), atol=1e-6)


@pytest.mark.parametrize(("from_rate", "to_rate"), RATE_PAIRS)
@pytest.mark.parametrize("n", PRIME_LENGTHS)
def test_sine_keeps_its_frequency_amplitude_and_phase(n, from_rate, to_rate):
    """A 440 Hz sine of a prime number of samples equals sin(2π·440·t) sampled at the new rate,
    away from the ends (the FFT's zero padding rings there)."""
    hz = 440.0
    out = resample(np.sin(2 * np.pi * hz * np.arange(n) / from_rate), from_rate, to_rate)
    expected = np.sin(2 * np.pi * hz * np.arange(len(out)) / to_rate)
    middle = slice(len(out) // 4, 3 * len(out) // 4)
    np.testing.assert_allclose(out[middle], expected[middle], atol=1e-3)
