"""`speedasr eval --ckpt CKPT --cuts CUTS`: WER and RTFx, with a per-utterance results file.

WER: `speedasr.metrics` (a standard normaliser chosen by ``--normalizer``, jiwer's alignment), with
its substitutions, deletions, insertions and hits, for the corpus and for each utterance.
RTFx = seconds of audio / wall seconds, measured twice: end to end (audio loading, features,
encoder, decoding) and model only (encoder + decoding, what ``speedasr bench rtfx`` compares).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from speedasr.data.manifests import Reject, format_reason_counts, reason_counts
from speedasr.errors import UserError
from speedasr.inference import add_decoding_arguments
from speedasr.metrics import (
    DEFAULT_NORMALIZER,
    NORMALIZERS,
    WordErrors,
    corpus_word_errors,
    normalize_text,
)


@dataclass
class EvalResult:
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    audio_seconds: float
    wall_seconds: float
    """Features + model, end to end."""
    model_seconds: float
    """Encoder + decoding only."""
    skipped: list[Reject] = field(default_factory=list)
    """Cuts left out because their audio failed to load, with the reason (in cut order)."""

    def word_errors(self, normalizer: str = DEFAULT_NORMALIZER) -> list[WordErrors]:
        """Per-utterance alignment counts (in ``ids`` order); their sum is the corpus's."""
        return corpus_word_errors(self.refs, self.hyps, normalizer)

    def wer(self, normalizer: str = DEFAULT_NORMALIZER) -> float:
        return sum(self.word_errors(normalizer), WordErrors()).wer


def evaluate(model, tokenizer, cuts, options, batch_duration: float = 200.0,
             batch_size: int | None = None, device: str = "cpu",
             progress: bool = False) -> EvalResult:  # fmt: skip
    """Transcribe ``cuts`` (with reference texts) in order; the numbers ``speedasr eval`` prints."""
    from speedasr.console import progress_bar
    from speedasr.decoding.transcribe import feature_frontend, iterate_batches, transcribe_batch
    from speedasr.inference import skipped_cuts

    result = EvalResult([], [], [], 0.0, 0.0, 0.0)
    bar = progress_bar(total=len(cuts), desc="eval", unit="utt", disable=not progress)
    start = time.perf_counter()
    batches = iterate_batches(
        cuts,
        tokenizer,
        batch_duration,
        device,
        batch_size,
        n_mels=model.cfg.n_mels,
        frontend=feature_frontend(model),
    )
    for batch in batches:
        result.skipped += skipped_cuts(batch)
        bar.update(len(batch.skipped_cut_ids))
        if batch.batch_size == 0:  # every cut of this batch failed to load
            continue
        t0 = time.perf_counter()
        result.hyps += transcribe_batch(model, tokenizer, batch, options)
        result.model_seconds += time.perf_counter() - t0
        result.refs += batch.texts
        result.ids += batch.cut_ids
        result.audio_seconds += batch.audio_seconds
        bar.update(batch.batch_size)
    result.wall_seconds = time.perf_counter() - start
    bar.close()
    return result


def report_skipped(skipped: list[Reject], total: int, max_listed: int = 20) -> None:
    """Print the skipped cuts: counts by reason, then one line per cut (the first `max_listed`)."""
    if not skipped:
        return
    print(f"skipped {len(skipped)} of {total} cuts ({format_reason_counts(skipped)}):")
    for r in skipped[:max_listed]:
        print(f"  {r.cut_id}: {r.reason}: {r.detail}")
    if len(skipped) > max_listed:
        print(f"  ... and {len(skipped) - max_listed} more (all of them in --json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt)")
    parser.add_argument("--cuts", required=True, help="lhotse cutset with reference transcripts")
    parser.add_argument(
        "--out",
        help="per-utterance results (JSONL: id, ref, hyp, wer, hits, substitutions, deletions, "
        "insertions, reference_words)",
    )
    parser.add_argument("--max-utterances", type=int, help="evaluate only the first N cuts")
    parser.add_argument(
        "--normalizer",
        choices=NORMALIZERS,
        default=DEFAULT_NORMALIZER,
        help="text normaliser applied to references and hypotheses before WER: whisper_en "
        "(default: Whisper's English normaliser), basic (Whisper's language-independent one), "
        "none (case and punctuation count); see docs/inference.md",
    )
    parser.add_argument("--json", help="also write the summary (wer, rtfx, ...) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from speedasr.data.manifests import load_cuts, validate_cuts
    from speedasr.inference import decoding_options, load_for_inference

    options = decoding_options(args)
    if args.max_utterances is not None and args.max_utterances < 1:
        raise UserError(f"--max-utterances must be >= 1, got {args.max_utterances}")
    loaded = load_for_inference(args, options)
    cuts = load_cuts(args.cuts)
    if args.max_utterances:
        cuts = cuts.subset(first=min(args.max_utterances, len(cuts)))
    total = len(cuts)
    cuts, report = validate_cuts(cuts, check_audio="header")
    result = EvalResult([], [], [], 0.0, 0.0, 0.0)
    if len(cuts):
        result = evaluate(
            loaded.model, loaded.tokenizer, cuts, options, args.batch_duration, args.batch_size,
            args.device, progress=not args.quiet,
        )  # fmt: skip
    skipped = report.rejects + result.skipped
    report_skipped(skipped, total)
    if not result.refs:  # a WER over no utterance would be a number about nothing
        raise UserError(
            f"no utterance of '{args.cuts}' could be evaluated: all {total} cuts were skipped "
            f"({format_reason_counts(skipped)})"
        )
    per_utterance = result.word_errors(args.normalizer)
    errors = sum(per_utterance, WordErrors())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            rows = zip(result.ids, result.refs, result.hyps, per_utterance, strict=True)
            for cut_id, ref, hyp, counts in rows:
                f.write(
                    json.dumps({"id": cut_id, "ref": ref, "hyp": hyp, **counts.to_dict()}) + "\n"
                )
    rtfx = result.audio_seconds / max(result.wall_seconds, 1e-9)
    model_rtfx = result.audio_seconds / max(result.model_seconds, 1e-9)
    search = f"beam {options.beam_size}" if options.beam_size > 1 else "greedy"
    search = "CTC greedy" if options.method == "ctc" else search
    if options.ctc_weight > 0:
        search += f" joint with CTC (weight {options.ctc_weight:g})"
    print(
        f"WER {100 * errors.wer:.2f}% ({errors.substitutions} substitutions, {errors.deletions} "
        f"deletions, {errors.insertions} insertions in {errors.reference_words} reference words; "
        f"{args.normalizer} normalizer) on {len(result.refs)} utterances "
        f"({result.audio_seconds / 60:.1f} min of audio"
        + (f"; {len(skipped)} of {total} cuts skipped, listed above" if skipped else "")
        + f"); RTFx {rtfx:.1f} end to end "
        f"({result.wall_seconds:.1f} s wall), {model_rtfx:.1f} model only; {search}, "
        f"device {args.device}, {args.dtype}, step {loaded.step}"
    )
    if args.json:
        summary = {
            **errors.to_dict(), "normalizer": args.normalizer, "utterances": len(result.refs),
            "audio_seconds": result.audio_seconds,
            "wall_seconds": result.wall_seconds, "model_seconds": result.model_seconds,
            "rtfx": rtfx, "model_rtfx": model_rtfx, "beam_size": options.beam_size,
            "decoder": options.method, "ctc_weight": options.ctc_weight, "step": loaded.step,
            "dtype": args.dtype, "cuts": total, "skipped_counts": reason_counts(skipped),
            "skipped": [r.to_dict() for r in skipped],
        }  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    for ref, hyp in list(zip(result.refs, result.hyps, strict=True))[:3]:
        ref, hyp = normalize_text(ref, args.normalizer), normalize_text(hyp, args.normalizer)
        print(f"  ref: {ref}\n  hyp: {hyp}")
    return 0
