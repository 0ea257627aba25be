"""`speedasr bench rtfx`: inference speed of encoder/decoder splits at equal parameters.

Canary-1B-flash moved layers from the decoder to the encoder (24/24 -> 32/4) and decodes ~3x
faster at the same accuracy: an autoregressive decoder runs once per emitted token, the encoder
once per utterance. This benchmark measures that trade on the machine at hand, side by side in one
run: same audio, same batches, same total parameters, untrained weights, and every configuration
emits exactly the same number of tokens per utterance (the reference length, with end-of-text
ignored), so the comparison measures the architecture, not what a model happened to predict.

RTFx = seconds of audio / seconds of model time (packed encoder + KV-cached greedy decoding;
features are computed once beforehand and not timed). Repeats are interleaved across
configurations (A B A B ...) so load on a shared machine hits all of them alike; medians are
reported. The FLOPs of each configuration come from ``speedasr.models.planner.inference_flops``.
``--threads`` (default: all cores) and ``--dtype`` (float32 or bfloat16) apply to every config.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from speedasr.bench.paired import median_paired_ratio, run_interleaved
from speedasr.data.bucketing import CHARS_PER_TOKEN
from speedasr.errors import UserError
from speedasr.options import add_dtype_argument

DEFAULT_SPLITS = "balanced=10/10,deep=16/2"
"""Canary-1B (24/24) vs Canary-1B-flash (32/4) scaled down to equal parameters at width 256:
10 + 10 layers hold ~390 d^2 weights, 16 + 2 ~400 d^2 (+3%)."""
"""Reference length without a tokenizer: BPE with a few hundred pieces on English text."""


@dataclass(frozen=True)
class Split:
    name: str
    encoder_layers: int
    decoder_layers: int


def parse_splits(text: str) -> list[Split]:
    """``"balanced=10/10,deep=16/2"`` -> splits; ``UserError`` on bad syntax."""
    splits = []
    for item in text.split(","):
        name, sep, layers = item.strip().rpartition("=")
        enc, slash, dec = layers.partition("/")
        if not sep or not slash or not enc.isdigit() or not dec.isdigit() or not name:
            raise UserError(f"--splits expects NAME=ENC/DEC[,NAME=ENC/DEC...], got '{item}'")
        if int(enc) < 1 or int(dec) < 1:
            raise UserError(f"split '{item}': layer counts must be >= 1")
        splits.append(Split(name, int(enc), int(dec)))
    if len({s.name for s in splits}) != len(splits):
        raise UserError("--splits: names must be distinct")
    return splits


@dataclass
class Utterances:
    """The benchmark audio, as features, with the token count each config must emit."""

    features: list[torch.Tensor]
    """``(T_i, n_mels)`` log-mel frames per utterance."""
    seconds: list[float]
    tokens: list[int]
    """Emitted tokens forced per utterance (the reference length)."""

    @property
    def audio_seconds(self) -> float:
        return sum(self.seconds)


def load_utterances(
    cuts_path: str | None, n: int, tokenizer_dir: str | None, n_mels: int
) -> Utterances:
    """The first ``n`` cuts of ``cuts_path`` (default: ``n`` eSpeak utterances made on the fly),
    as ``n_mels`` log-mel bins per frame (the benchmarked models' ``n_mels``)."""
    from speedasr.data.dataset import AsrDataset

    if cuts_path:
        from speedasr.data.manifests import load_cuts

        cuts = load_cuts(cuts_path)
        cuts = cuts.subset(first=min(n, len(cuts)))
    else:
        from speedasr.testing import make_tiny_cuts

        cuts = make_tiny_cuts(tempfile.mkdtemp(prefix="speedasr-rtfx-"), n, seed=7, speech=True)
    tokenizer = None
    if tokenizer_dir:
        from speedasr.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer_dir)
    extractor = AsrDataset(tokenizer, n_mels=n_mels)  # features only: the tokenizer is not used
    feats, seconds, tokens = [], [], []
    for cut in cuts:
        text = cut.supervisions[0].text if cut.supervisions else ""
        feats.append(extractor.features(cut))
        seconds.append(cut.duration)
        count = len(tokenizer.encode(text)) if tokenizer else round(len(text) / CHARS_PER_TOKEN)
        tokens.append(max(1, count))
    if not feats:
        raise UserError("no utterances to benchmark")
    return Utterances(feats, seconds, tokens)


def build_model(
    split: Split, d_model: int, heads: int, vocab_size: int, seed: int = 0,
    dtype: torch.dtype = torch.float32,
):  # fmt: skip
    from speedasr.models.aed import AEDModel, ModelConfig

    cfg = ModelConfig(
        vocab_size=vocab_size, d_model=d_model, encoder_heads=heads,
        encoder_layers=split.encoder_layers, decoder_layers=split.decoder_layers,
        subsampling_channels=64, dropout=0.0, ctc_weight=0.0, attention_backend="torch",
    )  # fmt: skip
    torch.manual_seed(seed)
    return AEDModel(cfg).to(dtype).eval()


def time_pass(
    model, utts: Utterances, batch_size: int, prompt: list[int], eot_id: int, cache: bool = True
) -> dict:
    """One timed pass over all utterances in batches of ``batch_size``: seconds in the encoder,
    in decoding, and the number of sequential decoder steps (``cache=False``: the uncached
    reference decoder, which re-runs the whole prefix at every step)."""
    from speedasr.core.segments import Segments
    from speedasr.decoding import DecodingOptions, decode_encoded

    options = DecodingOptions(ignore_eot=True, use_cache=cache)
    enc_s = dec_s = 0.0
    steps = 0
    with torch.inference_mode():
        for i in range(0, len(utts.features), batch_size):
            feats = utts.features[i : i + batch_size]
            forced = utts.tokens[i : i + batch_size]
            segments = Segments.from_lengths([f.shape[0] for f in feats])
            x = torch.cat(feats)
            t0 = time.perf_counter()
            enc, enc_segments = model.encode(x, segments)
            t1 = time.perf_counter()
            out = decode_encoded(
                model, enc, enc_segments, [prompt] * len(feats), eot_id, options, forced
            )
            t2 = time.perf_counter()
            if [len(o) for o in out] != forced:
                raise RuntimeError("decoding did not emit the forced lengths")
            enc_s, dec_s, steps = enc_s + t1 - t0, dec_s + t2 - t1, steps + max(forced)
    return {"encoder_s": enc_s, "decoder_s": dec_s, "steps": steps}


def benchmark(
    splits: list[Split], utts: Utterances, batch_sizes: list[int], repeats: int = 3,
    d_model: int = 256, heads: int = 4, vocab_size: int = 256, reference: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[dict]:  # fmt: skip
    """One row per (split, batch size): parameters, median timings, RTFx and FLOPs; with
    ``reference``, also the decoder time per step without KV cache (one pass)."""
    from speedasr.models.planner import inference_flops
    from speedasr.models.sizing import count_parameters

    prompt, eot_id = [2, 3, 4, 5], 1  # any ids: weights are untrained and end-of-text is ignored
    models = {s.name: build_model(s, d_model, heads, vocab_size, dtype=dtype) for s in splits}
    for s in splits:  # warm-up: allocator, thread pool, first-call dispatch
        time_pass(models[s.name], Utterances(utts.features[:2], utts.seconds[:2],
                                             utts.tokens[:2]), 2, prompt, eot_id)  # fmt: skip
    passes = {
        (s.name, b): functools.partial(time_pass, models[s.name], utts, b, prompt, eot_id)
        for b in batch_sizes
        for s in splits
    }
    runs = run_interleaved(passes, repeats)  # machine load affects every config alike
    rows = []
    for s in splits:
        cfg = models[s.name].cfg
        flops = [
            inference_flops(cfg, f.shape[0], n)
            for f, n in zip(utts.features, utts.tokens, strict=True)
        ]
        for b in batch_sizes:
            r = runs[(s.name, b)]
            total = statistics.median(x["encoder_s"] + x["decoder_s"] for x in r)
            enc = statistics.median(x["encoder_s"] for x in r)
            dec = statistics.median(x["decoder_s"] for x in r)
            rows.append({
                "name": s.name, "encoder_layers": s.encoder_layers,
                "decoder_layers": s.decoder_layers, "params": count_parameters(cfg).total,
                "batch_size": b, "rtfx": utts.audio_seconds / total,
                "encoder_s": enc, "decoder_s": dec, "decoder_steps": r[0]["steps"],
                "ms_per_step": 1e3 * dec / r[0]["steps"],
                "ms_per_step_per_layer": 1e3 * dec / r[0]["steps"] / s.decoder_layers,
                "encoder_gflop": sum(f.encoder for f in flops) / 1e9,
                "decoder_gflop": sum(f.decoder for f in flops) / 1e9,
                "repeats": [x["encoder_s"] + x["decoder_s"] for x in r],
            })  # fmt: skip
            if reference:
                ref = time_pass(models[s.name], utts, b, prompt, eot_id, cache=False)
                rows[-1]["ms_per_step_no_cache"] = 1e3 * ref["decoder_s"] / ref["steps"]
    # Speedup over the first split: time of the first over time of this one, paired by repeat.
    first = {r["batch_size"]: r for r in reversed(rows)}
    for r in rows:
        r["speedup_paired"] = median_paired_ratio(first[r["batch_size"]]["repeats"], r["repeats"])
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", help="audio to transcribe (default: eSpeak utterances made now)")
    parser.add_argument(
        "--tokenizer",
        help="count reference tokens with this tokenizer "
        f"(default: {CHARS_PER_TOKEN:g} characters per token)",
    )
    parser.add_argument("--utterances", type=int, default=32, help="how many cuts to use")
    parser.add_argument("--splits", default=DEFAULT_SPLITS, help="NAME=ENC/DEC layer splits")
    parser.add_argument("--d-model", type=int, default=256, help="width of every config")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="output vocabulary (default: the tokenizer's, else 256)",
    )
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)"
    )
    add_dtype_argument(
        parser,
        "float32",
        "weights and activations of every config (bfloat16: as deployed on GPUs, and fast "
        "on CPUs with AVX512-BF16/AMX; bf16, fp32 also accepted)",
        choices=("float32", "bfloat16"),
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the decoder without KV cache (one pass per row)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    # fmt: skip


def run(args: argparse.Namespace) -> int:
    splits = parse_splits(args.splits)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(
            f"--batch-sizes expects integers like 1,16, got '{args.batch_sizes}'"
        ) from None
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if min(batch_sizes) < 1 or args.repeats < 1 or args.utterances < 1 or threads < 1:
        raise UserError("--batch-sizes, --repeats, --utterances and --threads must be >= 1")
    if args.d_model % args.heads or (args.d_model // args.heads) % 2:
        raise UserError(f"--d-model {args.d_model} must split into {args.heads} even-sized heads")
    torch.set_num_threads(threads)
    from speedasr.inference import inference_dtype

    dtype = inference_dtype(args.dtype, "cpu")
    from speedasr.models.aed import ModelConfig

    # build_model leaves n_mels at ModelConfig's default: the features every config reads.
    utts = load_utterances(args.cuts, args.utterances, args.tokenizer, ModelConfig.n_mels)
    vocab = args.vocab_size
    if vocab is None:
        vocab = 256
        if args.tokenizer:
            from speedasr.data.tokenizer import Tokenizer

            vocab = Tokenizer.load(args.tokenizer).vocab_size
    rows = benchmark(
        splits, utts, batch_sizes, args.repeats, args.d_model, args.heads, vocab, args.reference,
        dtype,
    )  # fmt: skip
    print(
        f"{len(utts.features)} utterances, {utts.audio_seconds:.1f} s of audio, "
        f"{sum(utts.tokens)} forced tokens; d_model {args.d_model}, vocab {vocab}, "
        f"{args.dtype}, {threads} thread(s), median of {args.repeats}"
    )
    print(render(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        keys = ("name", "encoder_layers", "decoder_layers", "params", "batch_size", "rtfx")
        out = {
            "configs": [{k: r[k] for k in keys} for r in rows],
            "details": rows,
            "audio_seconds": utts.audio_seconds,
            "utterances": len(utts.features),
            "threads": threads,
            "dtype": args.dtype,
            "d_model": args.d_model,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def render(rows: list[dict]) -> str:
    """Markdown table. Speedups are relative to the first split at the same batch size: ratio
    of median RTFx, and median of the per-repeat ratios (``speedup_paired``)."""
    lines = [
        "| split | enc/dec layers | params | batch | RTFx | speedup | paired speedup | encoder s "
        "| decoder s | ms/step | ms/step/layer | enc GFLOP | dec GFLOP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = all("ms_per_step_no_cache" in r for r in rows)
    if ref:
        lines[0] += " ms/step, no cache |"
        lines[1] += "---|"
    base = {}
    for r in rows:
        base.setdefault(r["batch_size"], r["rtfx"])
        lines.append(
            f"| {r['name']} | {r['encoder_layers']}/{r['decoder_layers']} "
            f"| {r['params'] / 1e6:.2f}M | {r['batch_size']} | {r['rtfx']:.1f} "
            f"| {r['rtfx'] / base[r['batch_size']]:.2f}x | {r['speedup_paired']:.2f}x "
            f"| {r['encoder_s']:.3f} "
            f"| {r['decoder_s']:.3f} | {r['ms_per_step']:.2f} | {r['ms_per_step_per_layer']:.3f} "
            f"| {r['encoder_gflop']:.2f} | {r['decoder_gflop']:.2f} |"
            + (f" {r['ms_per_step_no_cache']:.2f} |" if ref else "")
        )
    return "\n".join(lines)
