"""Batched transcription, the one path from cuts to texts: packed, unaugmented batches of cuts
(``iterate_batches``) decoded with ``speedasr.decoding`` (``transcribe_batch``). Training-time
validation, ``speedasr eval``, ``speedasr transcribe``, the Python API and the benchmarks all use
it, so a WER measured in any of them is the same number.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from lhotse import CutSet, Recording
from lhotse.dataset import DynamicCutSampler

from speedasr.core.batch import PackedBatch, PaddedBatch
from speedasr.core.segments import Segments
from speedasr.data.audio import one_line
from speedasr.data.dataset import AsrDataset
from speedasr.data.tokenizer import Tokenizer
from speedasr.decoding import DecodingOptions, decode_encoded
from speedasr.errors import UserError


def batch_prompts(batch: PackedBatch) -> list[list[int]]:
    """The prompt ids at the start of each utterance's decoder input."""
    seqs = batch.token_segments.split(batch.tokens)
    return [seq[:p].tolist() for seq, p in zip(seqs, batch.prompt_lengths, strict=True)]


@torch.no_grad()
def transcribe_batch(
    model, tokenizer: Tokenizer, batch: PackedBatch | PaddedBatch,
    options: DecodingOptions | None = None,
    encoded: tuple[torch.Tensor, Segments] | None = None,
) -> list[str]:  # fmt: skip
    """Transcripts of one batch, in batch order (default options: greedy, KV cache, length guard
    from each utterance's own duration, so a transcript never depends on its batch).

    encoded: ``model.encode`` of this batch's packed features, to decode one batch several ways
    with one encoder pass (computed here when not given).
    """
    if isinstance(batch, PaddedBatch):
        batch = batch.to_packed()
    enc, enc_segments = encoded or model.encode(batch.features, batch.feature_segments)
    ids = decode_encoded(
        model, enc, enc_segments, batch_prompts(batch), eot_id=tokenizer.eot_id,
        options=options or DecodingOptions(),
    )  # fmt: skip
    return [tokenizer.decode(seq) for seq in ids]


def iterate_batches(
    cuts: CutSet, tokenizer: Tokenizer, batch_duration: float, device: torch.device | str,
    max_cuts: int | None = None, *, n_mels: int, frontend: torch.nn.Module | None = None,
) -> Iterator[PackedBatch]:  # fmt: skip
    """Packed, unaugmented batches of ``cuts`` in order (features computed in this process), with
    ``n_mels`` log-mel bins: the ``n_mels`` of the model that reads them (its checkpoint's).
    ``frontend``: the model's own feature module (``feature_frontend(model)``), if it has one."""
    dataset = AsrDataset(tokenizer, n_mels=n_mels, layout="packed", frontend=frontend)
    with warnings.catch_warnings():
        # Inference holds its cutset in memory on purpose (transcribe looks cuts up by id); the
        # sampler's advice to read it lazily is about training-sized manifests.
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet", category=UserWarning)
        sampler = DynamicCutSampler(
            cuts, max_duration=batch_duration, max_cuts=max_cuts, shuffle=False
        )
    for batch_cuts in sampler:
        yield dataset[batch_cuts].to(device)


def feature_frontend(model) -> torch.nn.Module | None:
    """The model's feature module (NeMo's front end of an imported Canary model) as a float32 CPU
    copy in eval mode, where the data loader computes features; None for lhotse's fbank."""
    import copy

    if getattr(model, "frontend", None) is None:
        return None
    return copy.deepcopy(model.frontend).to("cpu", torch.float32).eval()


def cuts_from_audio(paths: Iterable[str], language: str = "en") -> CutSet:
    """One cut per audio file, its id the path as given (two files of one name in different
    folders stay apart), at the file's own rate and channels: the dataset resamples to 16 kHz and
    averages the channels (``speedasr.data.audio.load_model_audio``). ``UserError`` if a file
    does not exist or its header cannot be read."""
    from lhotse import SupervisionSegment

    cuts = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"audio file '{p}' does not exist")
        try:
            rec = Recording.from_file(p, recording_id=str(p))
        except Exception as e:
            raise UserError(f"audio file '{p}' could not be read ({one_line(e)})") from None
        cut = rec.to_cut()
        cut.supervisions = [
            SupervisionSegment(cut.id, cut.recording_id, 0.0, cut.duration, text="",
                               channel=cut.channel, language=language)
        ]  # fmt: skip
        cuts.append(cut)
    return CutSet.from_cuts(cuts)
