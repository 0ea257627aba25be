"""Minimal ctypes binding of eSpeak NG, as shipped by the `espeakng-loader` wheel.

The wheel carries ``libespeak-ng.so`` and its voice data; nothing else is needed on the machine.
The C library keeps global state, so there is one engine per process (`Espeak.get()`), used from
one thread. Synthesis runs in synchronous mode: `espeak_Synth` returns when the whole text is done,
and the samples arrive through a callback that appends them to a list.

Determinism: eSpeak's waveform generator keeps state from one utterance to the next (the same text
said twice in a row comes out a few samples different), and mixes in noise from libc's `rand()`.
So each utterance is synthesized in a forked child of a process whose engine was initialized but
has never spoken, with `rand()` seeded per utterance: the samples depend on the inputs alone, not
on what was synthesized before or in which worker. A fork costs ~1 ms; an utterance ~10-50 ms.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings

import numpy as np

# Constants from espeak-ng/speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() on a bad data path
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1  # words per minute, 80..450
_PARAM_PITCH = 3  # base pitch, 0..100 (voice default 50)
_PARAM_RANGE = 4  # pitch range, 0..100 (voice default 50)

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """The process's eSpeak NG engine. Use `Espeak.get()`; not thread-safe."""

    _instance: Espeak | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from speedasr.extras import require

        espeakng_loader = require("espeakng_loader", "eSpeak NG speech synthesis")

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,  # text
            ctypes.c_size_t,  # size in bytes, including the terminating NUL
            ctypes.c_uint,  # position
            ctypes.c_int,  # position type
            ctypes.c_uint,  # end position (0 = none)
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique identifier (out)
            ctypes.c_void_p,  # user data
        ]
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"eSpeak NG failed to initialize with data at {data_path!r}")
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes frees the trampoline when the Python object dies.
        self._callback = _SynthCallback(self._on_samples)
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        # eSpeak draws noise (breathiness, voicing jitter) from libc's rand(); other libraries in
        # the process (torch, ...) may reseed or consume it. Seeding it before each utterance makes
        # the samples a function of the inputs alone.
        self._libc = ctypes.CDLL(None)
        self._libc.srand.argtypes = [ctypes.c_uint]

    @classmethod
    def get(cls) -> Espeak:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_samples(self, wav, num_samples: int, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, noise_seed: int = 0
    ) -> np.ndarray:
        """Speak `text` with `voice` (e.g. ``"en-us+f2"``). Returns int16 samples at `sample_rate`.

        rate: words per minute (80..450); pitch, pitch_range: 0..100 (eSpeak's scale, default 50);
        noise_seed: seeds the noise eSpeak mixes in. Equal inputs give equal samples.
        """
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            # Python warns about fork() in multi-threaded processes; the child only runs eSpeak
            # and numpy (no locks shared with other threads) and leaves through os._exit.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(read_fd)
                samples = self._synthesize_here(text, voice, rate, pitch, pitch_range, noise_seed)
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(samples.tobytes())
                code = 0
            except ValueError:
                code = 3
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 3:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        if code != 0:
            raise RuntimeError(f"eSpeak NG synthesis failed (exit code {code}) for text {text!r}")
        return np.frombuffer(data, dtype=np.int16).copy()

    def _synthesize_here(
        self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, noise_seed: int
    ) -> np.ndarray:
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        params = ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range))
        for param, value in params:
            lib.espeak_SetParameter(param, int(value), 0)
        encoded = text.encode("utf-8")
        self._chunks = []
        self._libc.srand(noise_seed & 0xFFFFFFFF)
        status = lib.espeak_Synth(
            encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"eSpeak NG synthesis failed (status {status}) for text {text!r}")
        lib.espeak_Synchronize()
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def trim_silence(samples: np.ndarray, sample_rate: int, margin: float) -> np.ndarray:
    """Cut leading/trailing silence (below 2% of the peak), keeping `margin` seconds of it."""
    magnitude = np.abs(samples.astype(np.int32))
    loud = np.flatnonzero(magnitude > 0.02 * magnitude.max(initial=1))
    if loud.size == 0:
        return samples
    keep = int(margin * sample_rate)
    return samples[max(0, loud[0] - keep) : loud[-1] + 1 + keep]


def _next_smooth(n: int) -> int:
    """Smallest integer >= n with no prime factor above 7; n must be >= 1 (0 has every factor)."""
    if n < 1:
        raise ValueError(f"_next_smooth needs n >= 1, got {n}")
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def resample(
    samples: np.ndarray, from_rate: int, to_rate: int, rolloff: float = 0.95
) -> np.ndarray:
    """Band-limited resampling in the frequency domain. Returns float32 with
    ``ceil(len * to_rate / from_rate)`` samples.

    The signal is zero-padded to a whole number of resampling periods, so the output grid lines up
    exactly; frequencies above ``rolloff`` times the lower Nyquist frequency fade out with a raised
    cosine (no aliasing, little ringing). The FFT treats the signal as periodic, which is harmless
    for utterances that start and end in silence. ~50x faster than a time-domain polyphase filter
    in numpy, which matters: eSpeak itself produces ~300 s of audio per second.
    """
    if from_rate == to_rate:
        return samples.astype(np.float32)
    if len(samples) == 0:
        return np.zeros(0, dtype=np.float32)
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    n_out = -(-len(samples) * up // down)
    periods = _next_smooth(-(-len(samples) // down))  # 7-smooth sizes keep the FFTs fast
    n_in_padded, n_out_padded = periods * down, periods * up
    spectrum = np.fft.rfft(samples.astype(np.float64), n_in_padded)
    bins = n_out_padded // 2 + 1
    spectrum = spectrum[:bins]
    if len(spectrum) < bins:
        spectrum = np.pad(spectrum, (0, bins - len(spectrum)))
    # Bin k is k * from_rate / n_in_padded Hz; fade from rolloff * nyquist to nyquist.
    nyquist = min(from_rate, to_rate) / 2
    freqs = np.arange(bins) * from_rate / n_in_padded
    fade = np.clip((freqs - rolloff * nyquist) / ((1 - rolloff) * nyquist), 0.0, 1.0)
    spectrum *= 0.5 * (1 + np.cos(np.pi * fade))
    out = np.fft.irfft(spectrum, n_out_padded) * (n_out_padded / n_in_padded)
    return out[:n_out].astype(np.float32)


def render(
    text: str,
    voice: str,
    rate: int,
    pitch: int,
    pitch_range: int,
    noise_seed: int = 0,
    sample_rate: int = 16000,
    margin: float = 0.1,
) -> np.ndarray:
    """Speak `text` and return float32 samples in [-1, 1] at `sample_rate`, with leading/trailing
    silence trimmed to `margin` seconds. Needs only numpy (no torch), so that worker processes
    stay small and forking per utterance stays cheap."""
    engine = Espeak.get()
    raw = engine.synthesize(text, voice, rate, pitch, pitch_range, noise_seed)
    raw = trim_silence(raw, engine.sample_rate, margin)
    audio = resample(raw.astype(np.float32) / 32768.0, engine.sample_rate, sample_rate)
    return np.clip(audio, -1.0, 1.0)
