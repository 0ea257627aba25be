"""`speedasr bench throughput`: training throughput of packed vs padded batches, side by side.

Same model (same initial weights), same cuts, same memory budget; for each strategy the first
``--steps`` batches are collated once (feature extraction is the same work per audio second in every
strategy, so it is left out), then timed forward + backward + AdamW step, ``--repeats`` times.
Reported: real audio seconds per wall second (median over repetitions) and activation memory
(bytes of tensors saved for backward, the part of peak memory that grows with the batch; on CUDA
also the allocator's peak).

Strategies (budget ``S`` = ``--budget-seconds``):
  - ``random``: lhotse's shuffled ``DynamicCutSampler``, padded layout, ``B × longest ≤ S``;
  - ``bucket2d``: speedasr 2D buckets, padded layout, ``B × longest ≤ S``;
  - ``packed``: packed layout, ``Σ duration ≤ S``, drawn from a plain shuffled order (one bucket).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from speedasr.errors import UserError

STRATEGIES = ("random", "bucket2d", "packed")


@dataclass
class StrategyResult:
    audio_seconds_per_second: float
    repeats: list[float]
    peak_memory_bytes: int
    peak_memory_bytes_per_audio_second: float
    batches: int
    audio_seconds: float
    utterances: int
    padding: dict[str, float]


def sampler_config(strategy: str, budget: float, total_seconds: float):
    from speedasr.bench.padding import auto_buckets
    from speedasr.data.sampling import SamplerConfig

    if strategy == "random":
        return SamplerConfig(mode="random", max_duration=budget, shuffle=True)
    if strategy == "bucket2d":
        # As many 2D buckets as the corpus fills (the padding bench's rule): too many buckets for
        # a small corpus would leave bucket2d's batches underfilled and the comparison unfair.
        n_d, n_k = auto_buckets(total_seconds, budget)
        return SamplerConfig(
            mode="bucket2d", max_duration=budget, shuffle=True, num_buckets=n_d,
            num_token_buckets=n_k,
        )  # fmt: skip
    # One bucket: a plain shuffled order, packed up to the budget of real audio.
    return SamplerConfig(
        mode="packed", max_duration=budget, num_buckets=1, num_token_buckets=1, shuffle=True,
        strict=False,
    )  # fmt: skip


def collate_batches(cuts, tokenizer, strategy: str, budget: float, steps: int, seed: int) -> list:
    from speedasr.data.dataset import AsrDataset
    from speedasr.data.sampling import build_sampler

    total = sum(c.duration for c in cuts)
    sampler = build_sampler(cuts, sampler_config(strategy, budget, total), tokenizer, seed=seed)
    dataset = AsrDataset(tokenizer, layout="packed" if strategy == "packed" else "padded")
    return [dataset[batch_cuts] for batch_cuts in islice(iter(sampler), steps)]


def activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward during one forward (deduplicated)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def time_strategy(model, batches: list, repeats: int, device: torch.device) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    audio = sum(b.audio_seconds for b in batches)
    # Warm-up step (allocator, attention plan caches) outside the timed region.
    model(batches[0]).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(audio / (time.perf_counter() - start))
    return rates


def run_benchmark(
    cuts, tokenizer, model_cfg, budget: float, steps: int, repeats: int, seed: int = 0,
    device: str = "cpu", strategies=STRATEGIES, progress=print,
) -> dict[str, StrategyResult]:  # fmt: skip
    from speedasr.data.padding import PaddingStats, batch_padding
    from speedasr.models.aed import AEDModel

    dev = torch.device(device)
    torch.manual_seed(seed)
    initial = AEDModel(model_cfg).state_dict()
    results = {}
    for strategy in strategies:
        batches = collate_batches(cuts, tokenizer, strategy, budget, steps, seed)
        if not batches:
            raise UserError(f"strategy {strategy}: the cuts gave no batch at budget {budget} s")
        batches = [b.to(dev) for b in batches]
        model = AEDModel(model_cfg).to(dev)
        model.load_state_dict(initial)
        model.train()
        stats = sum(
            (
                batch_padding(
                    b.feature_segments.lengths,
                    b.token_segments.lengths,
                    packed=strategy == "packed",
                )
                for b in batches
            ),
            start=PaddingStats(),
        )
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        memory = max(activation_bytes(model, b) for b in batches)
        if dev.type == "cuda":
            memory = max(memory, torch.cuda.max_memory_allocated(dev))
        rates = time_strategy(model, batches, repeats, dev)
        audio = sum(b.audio_seconds for b in batches)
        per_batch_audio = max(b.audio_seconds for b in batches)
        results[strategy] = StrategyResult(
            audio_seconds_per_second=statistics.median(rates),
            repeats=rates,
            peak_memory_bytes=memory,
            peak_memory_bytes_per_audio_second=memory / per_batch_audio,
            batches=len(batches),
            audio_seconds=audio,
            utterances=sum(b.batch_size for b in batches),
            padding=stats.fractions(),
        )
        progress(
            f"{strategy:9s} {results[strategy].audio_seconds_per_second:7.1f} audio s/s "
            f"(runs: {', '.join(f'{r:.1f}' for r in rates)}), {len(batches)} batches, "
            f"{audio:.0f} s audio, activations {memory / 2**20:.0f} MiB"
        )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="cutset with audio (e.g. the synth corpus)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--preset", default="tiny", help="model preset (speedasr model info)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model overrides")
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="memory budget (s)")
    parser.add_argument("--steps", type=int, default=8, help="batches timed per strategy")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write results here")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from speedasr.data.manifests import load_cuts, validate_cuts
    from speedasr.data.tokenizer import Tokenizer
    from speedasr.models.sizing import parse_overrides, preset

    if args.budget_seconds <= 0 or args.steps < 1 or args.repeats < 1:
        raise UserError("--budget-seconds must be > 0, --steps and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(args.tokenizer)
    cuts, report = validate_cuts(load_cuts(args.cuts), max_duration=args.budget_seconds)
    if report.rejected:
        print(f"data: {report.summary()}")
    overrides = parse_overrides(args.set)
    overrides.setdefault("attention_backend", "torch" if args.device == "cpu" else "auto")
    cfg = preset(args.preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, **overrides)
    print(
        f"bench throughput: preset {args.preset}, budget {args.budget_seconds} s, "
        f"{args.steps} batches x {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    results = run_benchmark(
        cuts.to_eager(), tokenizer, cfg, args.budget_seconds, args.steps, args.repeats,
        seed=args.seed, device=args.device,
    )  # fmt: skip
    packed, rnd, b2d = results["packed"], results["random"], results["bucket2d"]
    speed_random = packed.audio_seconds_per_second / rnd.audio_seconds_per_second
    speed_2d = packed.audio_seconds_per_second / b2d.audio_seconds_per_second
    mem_2d = packed.peak_memory_bytes_per_audio_second / b2d.peak_memory_bytes_per_audio_second
    print(
        f"packed / random: {speed_random:.2f}x; packed / bucket2d: {speed_2d:.2f}x; "
        f"activation memory per audio second packed / bucket2d: {mem_2d:.2f}x"
    )
    if args.json:
        out = {
            "strategies": {k: asdict(v) for k, v in results.items()},
            "ratios": {
                "packed_over_random": speed_random,
                "packed_over_bucket2d": speed_2d,
                "memory_per_audio_second_packed_over_bucket2d": mem_2d,
            },
            "settings": {k: v for k, v in vars(args).items() if k != "set"}
            | {"model": asdict(cfg)},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
