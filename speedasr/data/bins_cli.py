"""``speedasr bins --cuts CUTS [--tokenizer TOK] --out bins.json``: 2D bucket bins (and per-bucket
max TPS) estimated from a cutset's metadata (``speedasr.data.bucketing.estimate_bins``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from speedasr.data.bucketing import TokenCounter, estimate_bins, measure_cuts
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="lhotse cutset (.jsonl/.jsonl.gz)")
    parser.add_argument("--tokenizer", help="tokenizer directory; without it tokens are estimated")
    parser.add_argument("--out", required=True, help="output bins JSON")
    parser.add_argument("--num-buckets", type=int, default=30, help="duration buckets")
    parser.add_argument("--num-token-buckets", type=int, default=5, help="token sub-buckets each")
    parser.add_argument("--tps-threshold", type=float, default=4.0, help="TPS outlier z-score")
    parser.add_argument("--max-cuts", type=int, help="estimate from the first N cuts only")


def load_cuts_file(path: str):
    """A lhotse cutset from a manifest file, lazily; ``UserError`` if it cannot be read."""
    from lhotse import CutSet

    p = Path(path)
    if not p.is_file():
        raise UserError(f"cuts file '{path}' does not exist")
    try:
        return CutSet.from_file(p)
    except Exception as e:  # lhotse raises many types for a bad manifest
        raise UserError(f"cannot read cuts file '{path}': {e}") from None


def run(args: argparse.Namespace) -> int:
    from itertools import islice

    counter = TokenCounter(Tokenizer.load(args.tokenizer) if args.tokenizer else None, None)
    cuts = load_cuts_file(args.cuts)
    if args.max_cuts:
        cuts = islice(cuts, args.max_cuts)
    try:
        lengths, skipped = measure_cuts(cuts, counter)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read cuts from '{args.cuts}': {e}") from None
    bins = estimate_bins(lengths, args.num_buckets, args.num_token_buckets, args.tps_threshold)
    bins.meta.update(tokens=counter.name, cuts=str(args.cuts), skipped=skipped)
    bins.save(args.out)
    print(
        f"{bins.num_buckets} buckets ({len(bins.duration_edges)} duration x up to "
        f"{max(map(len, bins.token_edges))} token) from {len(lengths)} cuts; "
        f"{bins.meta['tps_outliers']} TPS outliers; skipped {skipped or 'none'} -> {args.out}"
    )
    return 0
