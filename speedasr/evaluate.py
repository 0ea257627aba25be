"""`speedasr eval --ckpt CKPT --cuts CUTS`: WER and RTFx, with a per-utterance results file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm import tqdm

from speedasr.metrics import normalize_text, word_error_rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt)")
    parser.add_argument("--cuts", required=True, help="lhotse cutset with reference transcripts")
    parser.add_argument("--out", help="per-utterance results (JSONL: id, ref, hyp, errors)")
    parser.add_argument("--batch-duration", type=float, default=200.0, help="seconds per batch")
    parser.add_argument("--max-utterances", type=int, help="evaluate only the first N cuts")
    parser.add_argument("--keep-case", action="store_true", help="do not lowercase for WER")
    parser.add_argument("--keep-punctuation", action="store_true", help="keep punctuation for WER")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from speedasr.checkpoint import load_model
    from speedasr.data.manifests import load_cuts, validate_cuts
    from speedasr.inference import iterate_batches, transcribe_batch

    loaded = load_model(args.ckpt, args.device)
    cuts = load_cuts(args.cuts)
    if args.max_utterances:
        cuts = cuts.subset(first=min(args.max_utterances, len(cuts)))
    cuts, report = validate_cuts(cuts, check_audio="header")
    if report.rejected:
        print(f"data: {report.summary()}")
    torch.set_num_threads(torch.get_num_threads())
    refs, hyps, ids, audio_seconds = [], [], [], 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(cuts), desc="eval", unit="utt")
    for batch in iterate_batches(cuts, loaded.tokenizer, args.batch_duration, args.device):
        hyps += transcribe_batch(loaded.model, loaded.tokenizer, batch)
        refs += batch.texts
        ids += batch.cut_ids
        audio_seconds += batch.audio_seconds
        bar.update(batch.batch_size)
    bar.close()
    wall = time.perf_counter() - start
    opts = dict(lowercase=not args.keep_case, strip_punctuation=not args.keep_punctuation)
    wer = word_error_rate(refs, hyps, **opts)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for cut_id, ref, hyp in zip(ids, refs, hyps):
                row = {"id": cut_id, "ref": ref, "hyp": hyp, "wer": word_error_rate([ref], [hyp], **opts)}
                f.write(json.dumps(row) + "\n")
    print(
        f"WER {100 * wer:.2f}% on {len(refs)} utterances ({audio_seconds / 60:.1f} min of audio); "
        f"RTFx {audio_seconds / wall:.1f} (features + greedy decoding, {wall:.1f} s wall, "
        f"device {args.device}, step {loaded.step})"
    )
    for ref, hyp in list(zip(refs, hyps))[:3]:
        print(f"  ref: {normalize_text(ref, **opts)}\n  hyp: {normalize_text(hyp, **opts)}")
    return 0
