"""`speedasr bench padding`: padding and batch fill of four batching strategies, metadata only.

At one memory budget (``--budget-seconds``: seconds of features per batch, padded
``B × longest`` for padded strategies, real ``Σ d`` for packed), one epoch of each strategy is
sampled and measured:

* ``random``   lhotse ``DynamicCutSampler`` (shuffled, no bucketing), padded;
* ``bucket1d`` lhotse ``DynamicBucketingSampler`` (duration buckets, as shipped), padded;
* ``bucket2d`` speedasr 2D buckets (duration × tokens), padded;
* ``packed``   speedasr packing over the same 2D buckets, zero padding by construction.

Reported per strategy: padding fractions of frames, tokens and attention scores
(``speedasr.data.padding``), batches per epoch, mean utterances and real seconds per batch, sampler
speed (cuts/s over the sampling loop only; token counts are computed once beforehand, as the
sampler's cache holds them in training) and rejected cuts by reason.

Every cut is either batched or counted with a reason (per strategy, ``cuts_seen + cuts_rejected``
is the corpus size): first the checks training runs before sampling
(``speedasr.data.manifests.validate_cuts``: duplicate ids, command sources, zero durations, cuts
past their recording's end, missing or empty transcripts), then the sampler's own (e.g. TPS
outliers). By default (``--check-audio none``) audio files are never opened, so that metadata-only
corpora (real-lengths TSVs, ``--synthetic-hours``) can be measured: a missing or corrupt file is
not seen then. ``--check-audio header`` / ``full`` adds the file checks of ``speedasr data
validate`` (missing, unreadable, header disagreeing with the manifest, NaN samples).

Token counts use ``--tokenizer`` (exactly the collator's prompt + text), else an estimate from
characters (``speedasr.data.bucketing.estimate_text_tokens``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from lhotse import CutSet

from speedasr.core.geometry import num_input_frames
from speedasr.data.bucketing import BucketBins, TokenCounter, estimate_bins, measure_cuts
from speedasr.data.manifests import ValidationReport, metadata_only_cut, validate_cuts
from speedasr.data.padding import PaddingStats, batch_padding
from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.prep.importers import import_tsv

STRATEGIES = ("random", "bucket1d", "bucket2d", "packed")


# --- inputs ----------------------------------------------------------------------------------


def load_corpus(path: str, language: str) -> tuple[CutSet, dict[str, Any]]:
    """Eager cuts from a lhotse manifest or a real-lengths TSV (``.tsv`` / ``.tsv.gz``), and
    what the import skipped (bad TSV lines are counted, never silently lost)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"cuts file '{path}' does not exist")
    if p.name.endswith((".tsv", ".tsv.gz")):
        cuts, report = import_tsv(p, language)
        return cuts.to_eager(), {
            "import_bad_lines": len(report.bad_lines),
            "import_report": report.summary(5),
        }
    try:
        return CutSet.from_file(p).to_eager(), {}
    except Exception as e:  # lhotse raises many types for a bad manifest
        raise UserError(f"cannot read cuts file '{path}': {e}") from None


def synthetic_corpus(hours: float, seed: int = 0) -> CutSet:
    """Metadata-only long-tailed read speech: lognormal durations (median 6 s, p95 ~17 s, at most
    30 s), 2.6 ± 0.35 words/s, English-like word lengths, 0.3% misaligned transcripts (3× words).
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(hours * 3600 / 7.2))  # mean of the distribution is ~7.2 s
    d = rng.lognormal(math.log(6.0), math.log(17 / 6) / 1.645, size=3 * n)
    d = d[(d >= 0.5) & (d <= 30.0)][:n]
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array(
        [
            12.7,
            9.1,
            8.2,
            7.5,
            7.0,
            6.7,
            6.3,
            6.1,
            6.0,
            4.3,
            4.0,
            2.8,
            2.8,
            2.4,
            2.4,
            2.2,
            2.0,
            2.0,
            1.9,
            1.5,
            1.0,
            0.8,
            0.15,
            0.15,
            0.1,
            0.07,
        ]
    )
    vocab = [
        "".join(rng.choice(letters, size=int(k), p=freq / freq.sum()))
        for k in np.clip(rng.gamma(3.0, 1.5, size=5000).round(), 1, 14)
    ]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    cuts = []
    for i, dur in enumerate(d):
        rate = float(np.clip(rng.normal(2.6, 0.35), 1.2, 4.5))
        words = max(1, round(rate * dur))
        if rng.random() < 0.003:
            words *= 3
        text = " ".join(vocab[j] for j in rng.choice(len(vocab), size=words, p=zipf))
        cuts.append(metadata_only_cut(f"synth-{i:07d}", float(dur), text, "en"))
    return CutSet.from_cuts(cuts)


# --- measurement -----------------------------------------------------------------------------


def auto_buckets(total_seconds: float, budget: float) -> tuple[int, int]:
    """``(duration buckets, token sub-buckets)`` for a corpus: up to 30 × 5, fewer when the corpus
    is small, so that every 2D bucket holds about 4 batches of audio (a bucket holding less than
    a batch gives only partial batches)."""
    cap = max(1, int(total_seconds // (4 * budget)))
    k = 5 if cap >= 25 else 3 if cap >= 9 else 2 if cap >= 4 else 1
    return max(1, min(30, cap // k)), k


def run_strategy(
    cuts: CutSet, cfg: SamplerConfig, counter: TokenCounter, bins: BucketBins, repeats: int
) -> dict[str, Any]:
    """Sample one epoch ``repeats`` times; padding stats from the first, best speed of all."""
    best, batches, rejected = math.inf, None, None
    for _ in range(repeats):
        sampler = build_sampler(
            cuts, cfg, None, world_size=1, rank=0, seed=0, bins=bins, counter=counter
        )
        t0 = time.perf_counter()
        got = [list(b) for b in sampler]
        best = min(best, time.perf_counter() - t0)
        if batches is None:
            batches, rejected = got, sampler.rejected.as_dict()
    packed = cfg.mode == "packed"
    stats, seconds, max_cost = PaddingStats(), [], 0.0
    for batch in batches:
        dur = [c.duration for c in batch]
        stats += batch_padding(
            [num_input_frames(x) for x in dur], [counter(c) for c in batch], packed
        )
        seconds.append(sum(dur))
        max_cost = max(max_cost, sum(dur) if packed else len(dur) * max(dur))
    n_b, n_c = len(batches), sum(map(len, batches))
    return {
        **stats.fractions(),
        "batches": n_b,
        "mean_cuts_per_batch": n_c / max(1, n_b),
        "mean_real_seconds_per_batch": float(np.mean(seconds)) if seconds else 0.0,
        "budget_fill": float(np.mean(seconds)) / cfg.max_duration if seconds else 0.0,
        "max_batch_seconds_computed": max_cost,
        "cuts_per_second": n_c / best if best > 0 else float("inf"),
        "cuts_seen": n_c,
        "cuts_rejected": rejected["total"],
        "rejected": rejected,
    }


def benchmark(
    cuts: CutSet,
    budget: float,
    tokenizer: Tokenizer | None = None,
    num_buckets: int | None = None,
    num_token_buckets: int | None = None,
    num_buckets_1d: int | None = None,
    repeats: int = 1,
    strict: bool = True,
    check_audio: str = "none",
) -> dict[str, Any]:
    """Run the four strategies on ``cuts`` at ``budget`` seconds; the JSON-ready result.
    check_audio: the audio checks of the validation that comes first (module docstring)."""
    if not budget > 0:
        raise UserError(f"--budget-seconds must be > 0, got {budget}")
    total = len(cuts)
    cuts, validation = validate_cuts(cuts, check_audio=check_audio)
    counter = TokenCounter(tokenizer, cache_size=None)
    lengths, skipped = measure_cuts(cuts, counter)  # also fills the token cache
    if not lengths:
        raise UserError(
            f"no usable cut: {validation.summary()} Skipped when measured: {skipped or 'none'}"
        )
    dur = np.array([d for d, _ in lengths])
    auto_d, auto_k = auto_buckets(float(dur.sum()), budget)
    n_d, n_k = num_buckets or auto_d, num_token_buckets or auto_k
    bins = estimate_bins(lengths, n_d, n_k)
    n_1d = num_buckets_1d or max(2, len(bins.duration_edges))
    # Enough buffered cuts for every bucket to hold about two batches.
    buffer = max(20000, math.ceil(2 * max(n_1d, bins.num_buckets) * budget / float(dur.mean())))
    base = SamplerConfig(
        max_duration=budget, shuffle=True, buffer_size=buffer, strict=strict, num_buckets=n_1d
    )
    result: dict[str, Any] = {"strategies": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lhotse warns about eager cutsets and tiny budgets
        for mode in STRATEGIES:
            cfg = replace(base, mode=mode)
            stats = run_strategy(cuts, cfg, counter, bins, repeats)
            result["strategies"][mode] = with_validation_rejects(stats, validation)
    tok = np.array([t for _, t in lengths])
    result["corpus"] = {
        "cuts": total,
        "usable_cuts": len(lengths),
        "validation": validation.to_dict(),
        "hours": float(dur.sum() / 3600),
        "duration_p50_p95_max": [
            float(np.percentile(dur, 50)),
            float(np.percentile(dur, 95)),
            float(dur.max()),
        ],
        "tokens_p50_p95_max": [
            float(np.percentile(tok, 50)),
            float(np.percentile(tok, 95)),
            float(tok.max()),
        ],
        "tokens": counter.name,
    }
    result["settings"] = {
        "budget_seconds": budget,
        "buckets_2d": [len(bins.duration_edges), n_k, bins.num_buckets],
        "buckets_1d": n_1d,
        "buffer_size": buffer,
        "strict": strict,
        "repeats": repeats,
        "tps_outliers_in_estimate": bins.meta["tps_outliers"],
    }
    return result


def with_validation_rejects(stats: dict[str, Any], validation: ValidationReport) -> dict[str, Any]:
    """A strategy's ``stats`` with the cuts validation rejected before sampling added to its
    rejected cuts (counts by reason and example ids), so that every cut is accounted for."""
    rejected = stats["rejected"]
    counts, examples = dict(rejected["counts"]), dict(rejected["examples"])
    for r in validation.rejects:
        counts[r.reason] = counts.get(r.reason, 0) + 1
        listed = examples.setdefault(r.reason, [])
        if len(listed) < 10:
            listed.append(r.cut_id)
    total = rejected["total"] + validation.rejected
    return {
        **stats,
        "cuts_rejected": total,
        "rejected": {"total": total, "counts": counts, "examples": examples},
    }


def format_table(result: dict[str, Any]) -> str:
    rows = [
        "| strategy | frames pad | tokens pad | attention pad | batches | cuts/batch "
        "| real s/batch (fill) | cuts/s | rejected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    budget = result["settings"]["budget_seconds"]
    for name, s in result["strategies"].items():
        rej = s["rejected"]["counts"]
        rej_s = ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "0"
        real = s["mean_real_seconds_per_batch"]
        rows.append(
            f"| {name} | {s['padding_frames']:.1%} | {s['padding_tokens']:.1%} "
            f"| {s['padding_attention']:.1%} | {s['batches']} | {s['mean_cuts_per_batch']:.1f} "
            f"| {real:.0f} ({real / budget:.0%}) "
            f"| {s['cuts_per_second']:,.0f} | {rej_s} |"
        )
    return "\n".join(rows)


# --- CLI -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--cuts", help="lhotse cutset (.jsonl[.gz]) or real-lengths TSV (.tsv[.gz])")
    src.add_argument(
        "--synthetic-hours",
        type=float,
        help="use a synthetic long-tailed read-speech profile of this many hours",
    )
    parser.add_argument("--tokenizer", help="tokenizer directory (default: estimate tokens)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        required=True,
        help="seconds of features per batch (padded size; real audio if packed)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--language", default="en", help="language of TSV transcripts")
    parser.add_argument("--num-buckets", type=int, help="2D duration buckets (default: auto)")
    parser.add_argument(
        "--num-token-buckets", type=int, help="2D token sub-buckets (default: auto)"
    )
    parser.add_argument(
        "--num-buckets-1d", type=int, help="1D buckets (default: as many as 2D duration buckets)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per strategy (best)")
    parser.add_argument("--lenient", action="store_true", help="2D lenient mode (no TPS rejects)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic-hours")
    parser.add_argument(
        "--check-audio",
        choices=("none", "header", "full"),
        default="none",
        help="none (default): metadata checks only, audio files are never opened; header/full: "
        "also count missing, unreadable or NaN audio as `speedasr data validate` does",
    )


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    imported: dict[str, Any] = {}
    if args.cuts:
        cuts, imported = load_corpus(args.cuts, args.language)
    else:
        if not args.synthetic_hours > 0:
            raise UserError("--synthetic-hours must be > 0")
        cuts = synthetic_corpus(args.synthetic_hours, args.seed)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    result = benchmark(
        cuts,
        args.budget_seconds,
        tokenizer,
        args.num_buckets,
        args.num_token_buckets,
        args.num_buckets_1d,
        args.repeats,
        strict=not args.lenient,
        check_audio=args.check_audio,
    )
    result["corpus"]["source"] = args.cuts or f"synthetic {args.synthetic_hours} h seed {args.seed}"
    result["corpus"].update(imported)
    if imported.get("import_bad_lines"):
        print(imported["import_report"])
    c, s = result["corpus"], result["settings"]
    print(
        f"{c['source']}: {c['cuts']} cuts, {c['hours']:.2f} h, duration p50/p95/max "
        f"{c['duration_p50_p95_max'][0]:.1f}/{c['duration_p50_p95_max'][1]:.1f}/"
        f"{c['duration_p50_p95_max'][2]:.1f} s, tokens ({c['tokens']}) p50/p95/max "
        f"{c['tokens_p50_p95_max'][0]:.0f}/{c['tokens_p50_p95_max'][1]:.0f}/"
        f"{c['tokens_p50_p95_max'][2]:.0f}; budget {s['budget_seconds']:g} s; 2D buckets "
        f"{s['buckets_2d'][2]} ({s['buckets_2d'][0]} x <= {s['buckets_2d'][1]}), 1D buckets "
        f"{s['buckets_1d']}"
    )
    validation = result["corpus"]["validation"]
    if validation["rejected"]:
        reasons = ", ".join(f"{k} {v}" for k, v in validation["counts"].items())
        print(
            f"rejected before sampling (audio check: {validation['check_audio']}): "
            f"{validation['rejected']} of {validation['total']} cuts ({reasons})"
        )
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
