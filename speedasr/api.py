"""The Python API: ``speedasr.load(ckpt)`` -> ``Transcriber``; ``transcribe(inputs)`` -> texts.

A thin layer over the code ``speedasr transcribe`` runs (``speedasr.checkpoint.load_model``,
``speedasr.decoding.transcribe``'s ``iterate_batches`` / ``transcribe_batch``), so a text from
the API is the text the command prints for the same checkpoint, audio and options. Inputs
become lhotse cuts first: audio files as ``speedasr transcribe`` reads them, arrays as in-memory
WAV recordings at their own rate (float32 WAV is lossless), so every input is resampled to the
model's 16 kHz by the one loading path, ``speedasr.data.audio.load_model_audio``.

Bad input raises ``speedasr.errors.UserError`` (or ``ValueError`` for bad decoding options) with
a one-line message naming the input: the API never skips an input silently.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from speedasr.checkpoint import LoadedModel, load_model
from speedasr.decoding import DecodingOptions
from speedasr.decoding.transcribe import feature_frontend, iterate_batches, transcribe_batch
from speedasr.errors import UserError
from speedasr.inference import DTYPES, inference_dtype
from speedasr.nn.attention import BACKENDS, check_attention_backend

if TYPE_CHECKING:
    from lhotse import CutSet
    from lhotse.cut import Cut

AudioInput = Any
"""One input: an audio file path (``str`` / ``Path``), a lhotse ``Cut``, or a 1-D float
``numpy.ndarray`` / ``torch.Tensor`` of samples (with ``sample_rate``)."""


def load(
    ckpt: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attention_backend: str | None = None,
) -> Transcriber:
    """The model of a speedasr checkpoint, ready to transcribe (eval mode, on ``device``).

    dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (GPU only), or the torch
    dtype. attention_backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"flash_attn"`` (None:
    the checkpoint's ``model.attention_backend``). ``UserError`` for a missing or unreadable
    checkpoint, an unknown dtype or backend, or a backend that cannot run on ``device``.
    """
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise UserError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
        dtype = names[dtype]
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if attention_backend is not None and attention_backend not in BACKENDS:
        raise UserError(
            f"attention_backend '{attention_backend}' is not one of {', '.join(BACKENDS)}"
        )
    torch_dtype = inference_dtype(dtype, device)
    loaded = load_model(ckpt, device, torch_dtype, attention_backend)
    backend = loaded.config.attention_backend
    check_attention_backend(
        backend, torch.device(device).type == "cuda",
        setting=(f"attention_backend='{backend}'" if attention_backend else
                 f"checkpoint '{ckpt}': model.attention_backend={backend}"),
        device=f"device is {device}", instead="attention_backend='auto' or 'torch'",
    )  # fmt: skip
    return Transcriber(loaded, ckpt, torch.device(device))


class Transcriber:
    """A loaded checkpoint: ``transcribe`` audio; ``model``, ``tokenizer`` and ``config`` are the
    ``AEDModel``, ``Tokenizer`` and ``ModelConfig`` for anything else (e.g.
    ``speedasr.export.export_model``)."""

    def __init__(self, loaded: LoadedModel, ckpt: str | Path, device: torch.device) -> None:
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.step = loaded.step
        self.ckpt, self.device = str(ckpt), device

    def __repr__(self) -> str:
        return (
            f"Transcriber('{self.ckpt}', device={self.device}, dtype={self.model.weight_dtype}, "
            f"step={self.step})"
        )

    def transcribe(
        self,
        inputs: AudioInput | Sequence[AudioInput] | CutSet,
        *,
        sample_rate: int | None = None,
        language: str = "en",
        decoder: Literal["attention", "ctc"] = "attention",
        beam_size: int = 1,
        ctc_weight: float = 0.0,
        length_penalty: float = 1.0,
        max_len: int | None = None,
        batch_duration: float = 200.0,
        batch_size: int | None = None,
    ) -> list[str]:
        """Transcripts of ``inputs``, one per input, in input order (a single input gives a list
        of one).

        Args:
            inputs: audio file paths (any rate and channel count soundfile reads), lhotse cuts
                (or a ``CutSet``), 1-D float arrays (numpy or torch), or a list mixing them.
            sample_rate: Hz of the array inputs (required with arrays; any rate: resampled).
            language: prompt language of paths and arrays (a cut's is its supervision's).
            decoder, beam_size, ctc_weight, length_penalty, max_len: the search, as
                ``speedasr transcribe``'s flags of the same names (``DecodingOptions``).
            batch_duration: seconds of audio per batch; batch_size: most utterances per batch.
                Neither changes a transcript (each utterance decodes as if alone).
        """
        options = self._options(decoder, beam_size, ctc_weight, length_penalty, max_len)
        if batch_duration <= 0:
            raise UserError(f"batch_duration must be > 0, got {batch_duration}")
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        cuts, names = self._cuts(inputs, sample_rate, language)
        if not cuts:
            return []
        cutset = _checked(cuts, names)
        texts: dict[str, str] = {}
        batches = iterate_batches(
            cutset, self.tokenizer, batch_duration, self.device, batch_size,
            n_mels=self.config.n_mels, frontend=feature_frontend(self.model),
        )  # fmt: skip
        for batch in batches:
            for cut_id, (reason, detail) in zip(
                batch.skipped_cut_ids, batch.skipped_reasons, strict=True
            ):
                raise UserError(f"{names[cut_id]}: cannot be transcribed: {reason} ({detail})")
            texts.update(zip(batch.cut_ids, transcribe_batch(
                self.model, self.tokenizer, batch, options
            ), strict=True))  # fmt: skip
        return [texts[cut.id] for cut in cuts]

    def _options(self, decoder, beam_size, ctc_weight, length_penalty, max_len) -> DecodingOptions:
        try:
            options = DecodingOptions(
                method=decoder, beam_size=beam_size, ctc_weight=ctc_weight,
                length_penalty=length_penalty, max_len=max_len,
            )  # fmt: skip
        except ValueError as e:
            raise UserError(f"decoding options: {e}") from None
        no_head = self.model.ctc_head is None
        if no_head and (options.method == "ctc" or options.ctc_weight > 0):
            what = "decoder='ctc'" if options.method == "ctc" else "ctc_weight > 0"
            raise UserError(f"{self.ckpt}: {what} needs a CTC head; this model has none")
        return options

    def _cuts(
        self, inputs, sample_rate: int | None, language: str
    ) -> tuple[list[Cut], dict[str, str]]:
        """One cut per input with the id ``input-<index>`` (the same file twice is two inputs),
        and a name per id for error messages: the path, ``array <index>`` or ``cut '<id>'``."""
        from lhotse import CutSet
        from lhotse.cut import Cut

        from speedasr.decoding.transcribe import cuts_from_audio

        if isinstance(inputs, (str, Path, np.ndarray, torch.Tensor, Cut)):
            inputs = [inputs]
        elif isinstance(inputs, CutSet):
            inputs = list(inputs)
        elif not isinstance(inputs, Sequence):
            raise UserError(
                f"inputs must be a path, cut, array or a list of them, got {type(inputs).__name__}"
            )
        self.tokenizer.prompt(language)  # an unknown language fails before any audio is read
        cuts, names = [], {}
        for i, item in enumerate(inputs):
            cut_id = f"input-{i}"
            if isinstance(item, (str, Path)):
                cut, names[cut_id] = cuts_from_audio([str(item)], language)[0], f"'{item}'"
            elif isinstance(item, Cut):
                cut, names[cut_id] = item, f"cut '{item.id}'"
            elif isinstance(item, (np.ndarray, torch.Tensor)):
                cut, names[cut_id] = _array_cut(item, sample_rate, language, i), f"array {i}"
            else:
                raise UserError(
                    f"input {i}: expected an audio path, a lhotse Cut or a 1-D array, got "
                    f"{type(item).__name__}"
                )
            cuts.append(cut.with_id(cut_id))
        return cuts, names


def _array_cut(samples, sample_rate: int | None, language: str, index: int) -> Cut:
    """A cut of 1-D float ``samples`` at ``sample_rate`` Hz, held in memory as float32 WAV."""
    import soundfile as sf
    from lhotse import Recording, SupervisionSegment

    if sample_rate is None:
        raise UserError(f"array {index}: give sample_rate= with array inputs (Hz, e.g. 16000)")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise UserError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    if samples.ndim != 1:
        raise UserError(
            f"array {index}: expected 1-D samples (mono), got shape {tuple(samples.shape)}; "
            "give several utterances as a list of arrays"
        )
    if not np.issubdtype(samples.dtype, np.floating):
        raise UserError(
            f"array {index}: expected float samples in [-1, 1], got {samples.dtype} "
            "(for int16 audio divide by 32768)"
        )
    if samples.size == 0:
        raise UserError(f"array {index}: has no samples")
    if not np.isfinite(samples).all():
        raise UserError(f"array {index}: has NaN or infinite samples")
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), sample_rate, format="WAV", subtype="FLOAT")
    recording = Recording.from_bytes(buffer.getvalue(), recording_id=f"array-{index}")
    cut = recording.to_cut()
    cut.supervisions = [
        SupervisionSegment(cut.id, cut.recording_id, 0.0, cut.duration, text="",
                           channel=cut.channel, language=language)
    ]  # fmt: skip
    return cut


def _checked(cuts: list[Cut], names: dict[str, str]) -> CutSet:
    """``speedasr transcribe``'s checks of the inputs (unreadable or missing audio, zero
    duration, command sources); the first failure is a ``UserError`` naming its input."""
    from lhotse import CutSet

    from speedasr.data.manifests import validate_cuts

    accepted, report = validate_cuts(
        CutSet.from_cuts(cuts), check_audio="header", require_text=False
    )
    if report.rejects:
        first = report.rejects[0]
        more = f" (and {len(report.rejects) - 1} more inputs)" if len(report.rejects) > 1 else ""
        raise UserError(
            f"{names[first.cut_id]}: cannot be transcribed: {first.reason} ({first.detail}){more}"
        )
    return accepted
