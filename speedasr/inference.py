"""Batched transcription: ``speedasr transcribe --ckpt CKPT AUDIO...``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator

import torch
from lhotse import CutSet, Recording
from lhotse.dataset import DynamicCutSampler

from speedasr.data.batch import PackedBatch, PaddedBatch
from speedasr.data.dataset import SAMPLE_RATE, AsrDataset
from speedasr.data.tokenizer import Tokenizer
from speedasr.decoding import greedy_decode
from speedasr.errors import UserError


def batch_prompts(batch: PackedBatch) -> list[list[int]]:
    """The prompt ids at the start of each utterance's decoder input."""
    seqs = batch.token_segments.split(batch.tokens)
    return [seq[:p].tolist() for seq, p in zip(seqs, batch.prompt_lengths)]


def default_max_tokens(duration: float) -> int:
    """Decoding length guard: 10 tokens per second of audio (+8) is generous for BPE speech."""
    return max(16, int(10 * duration) + 8)


@torch.no_grad()
def transcribe_batch(model, tokenizer: Tokenizer, batch: PackedBatch | PaddedBatch) -> list[str]:
    """Greedy transcripts of one batch, in batch order."""
    if isinstance(batch, PaddedBatch):
        batch = batch.to_packed()
    max_len = default_max_tokens(max(batch.durations, default=1.0))
    ids = greedy_decode(
        model, batch.features, batch.feature_segments, batch_prompts(batch),
        eot_id=tokenizer.eot_id, max_len=max_len,
    )  # fmt: skip
    return [tokenizer.decode(seq) for seq in ids]


def iterate_batches(
    cuts: CutSet, tokenizer: Tokenizer, batch_duration: float, device: torch.device | str
) -> Iterator[PackedBatch]:
    """Packed, unaugmented batches of ``cuts`` in order (features computed in this process)."""
    dataset = AsrDataset(tokenizer, layout="packed")
    for batch_cuts in DynamicCutSampler(cuts, max_duration=batch_duration, shuffle=False):
        yield dataset[batch_cuts].to(device)


def cuts_from_audio(paths: Iterable[str]) -> CutSet:
    """One cut per audio file (resampled to 16 kHz on the fly). ``UserError`` if unreadable."""
    cuts = []
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"audio file '{p}' does not exist")
        try:
            rec = Recording.from_file(p)
        except Exception as e:
            raise UserError(f"audio file '{p}' could not be read ({e})") from None
        if rec.num_channels != 1:
            raise UserError(f"audio file '{p}' has {rec.num_channels} channels; expected mono")
        cut = rec.to_cut()
        cuts.append(cut.resample(SAMPLE_RATE) if rec.sampling_rate != SAMPLE_RATE else cut)
    return CutSet.from_cuts(cuts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", nargs="+", help="audio files (any format soundfile reads)")
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt)")
    parser.add_argument("--language", default="en", help="prompt language token")
    parser.add_argument("--batch-duration", type=float, default=200.0, help="seconds per batch")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from speedasr.checkpoint import load_model

    loaded = load_model(args.ckpt, args.device)
    loaded.tokenizer.prompt(args.language)  # validates the language before any work
    cuts = cuts_from_audio(args.audio)
    cuts = cuts.map(lambda c: _with_language(c, args.language))
    for batch in iterate_batches(cuts, loaded.tokenizer, args.batch_duration, args.device):
        for cut_id, text in zip(batch.cut_ids, transcribe_batch(loaded.model, loaded.tokenizer, batch)):
            print(f"{cuts[cut_id].recording.sources[0].source}\t{text}")
    return 0


def _with_language(cut, language: str):
    from lhotse import SupervisionSegment

    cut.supervisions = [
        SupervisionSegment(cut.id, cut.recording_id, 0.0, cut.duration, text="", language=language)
    ]
    return cut
