"""`speedasr bench throughput`: training throughput of packed vs padded batches, side by side.

Same model (same initial weights), same cuts, same memory budget; for each strategy the first
``--steps`` batches are collated once (feature extraction is the same work per audio second in every
strategy, so it is left out), then timed forward + backward + AdamW step, ``--repeats`` passes
per strategy, interleaved across strategies (random, bucket2d, packed, random, ...) so that load
from other jobs hits every strategy alike (``speedasr.bench.paired``). Each strategy keeps its own
model copy and optimizer for its passes. Reported: real audio seconds per wall second (median over
passes), speed ratios as the median of per-repeat ratios, and activation memory (bytes of tensors
saved for backward, the part of peak memory that grows with the batch; on CUDA also the
allocator's peak above what the other strategies hold).

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

from speedasr.bench.paired import median_paired_ratio, run_interleaved
from speedasr.data.padding import PaddingStats, batch_padding
from speedasr.errors import UserError
from speedasr.models.aed import ModelConfig
from speedasr.options import add_config_overrides

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


def collate_batches(
    cuts, tokenizer, strategy: str, budget: float, steps: int, seed: int, n_mels: int
) -> list:
    """The strategy's first ``steps`` batches, with ``n_mels`` log-mel bins (the model's)."""
    from speedasr.data.dataset import AsrDataset
    from speedasr.data.sampling import build_sampler

    total = sum(c.duration for c in cuts)
    sampler = build_sampler(cuts, sampler_config(strategy, budget, total), tokenizer, seed=seed)
    layout = "packed" if strategy == "packed" else "padded"
    dataset = AsrDataset(tokenizer, n_mels=n_mels, layout=layout)
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


class TrainingPass:
    """One strategy's model, optimizer and device batches; each call times one pass over the
    batches (forward + backward + AdamW step per batch) and returns real audio seconds per wall
    second."""

    def __init__(self, model, batches: list, device: torch.device):
        self.model, self.batches, self.device = model, batches, device
        self.audio_seconds = sum(b.audio_seconds for b in batches)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        # Warm-up step (allocator, attention plan caches) outside the timed passes.
        model(batches[0]).loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        self._synchronize()
        start = time.perf_counter()
        for batch in self.batches:
            self.model(batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._synchronize()
        return self.audio_seconds / (time.perf_counter() - start)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class PreparedStrategy:
    """A strategy's batches on the device, measured once; ``timer`` times its passes."""

    batches: list
    padding: PaddingStats
    memory_bytes: int
    timer: TrainingPass


def prepare_strategy(
    strategy: str, cuts, tokenizer, model_cfg, initial: dict, budget: float, steps: int,
    seed: int, device: torch.device,
) -> PreparedStrategy:  # fmt: skip
    """Collate the strategy's first ``steps`` batches, count their padding, measure activation
    memory, and build its model from the shared ``initial`` weights."""
    from speedasr.models.aed import AEDModel

    batches = collate_batches(cuts, tokenizer, strategy, budget, steps, seed, model_cfg.n_mels)
    if not batches:
        raise UserError(f"strategy {strategy}: the cuts gave no batch at budget {budget} s")
    # The other strategies' models and batches stay on the device for the interleaved passes:
    # the allocator's peak counts from what they already hold.
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [b.to(device) for b in batches]
    model = AEDModel(model_cfg).to(device)
    model.load_state_dict(initial)
    model.train()
    padding = sum(
        (
            batch_padding(
                b.feature_segments.lengths, b.token_segments.lengths, packed=strategy == "packed"
            )
            for b in batches
        ),
        start=PaddingStats(),
    )
    memory = max(activation_bytes(model, b) for b in batches)
    if device.type == "cuda":
        memory = max(memory, torch.cuda.max_memory_allocated(device) - held)
    return PreparedStrategy(batches, padding, memory, TrainingPass(model, batches, device))


def run_benchmark(
    cuts, tokenizer, model_cfg, budget: float, steps: int, repeats: int, seed: int = 0,
    device: str = "cpu", strategies=STRATEGIES, progress=print,
) -> dict[str, StrategyResult]:  # fmt: skip
    """Every strategy's passes, interleaved (random, bucket2d, packed, random, ...): load from
    other jobs on the machine hits every strategy alike. Compare strategies with
    ``median_paired_ratio`` of their ``repeats``."""
    from speedasr.models.aed import AEDModel

    dev = torch.device(device)
    torch.manual_seed(seed)
    initial = AEDModel(model_cfg).state_dict()
    prepared = {
        strategy: prepare_strategy(
            strategy, cuts, tokenizer, model_cfg, initial, budget, steps, seed, dev
        )
        for strategy in strategies
    }
    rates = run_interleaved({name: p.timer for name, p in prepared.items()}, repeats)
    results = {}
    for strategy, p in prepared.items():
        audio = p.timer.audio_seconds
        results[strategy] = StrategyResult(
            audio_seconds_per_second=statistics.median(rates[strategy]),
            repeats=rates[strategy],
            peak_memory_bytes=p.memory_bytes,
            peak_memory_bytes_per_audio_second=p.memory_bytes
            / max(b.audio_seconds for b in p.batches),
            batches=len(p.batches),
            audio_seconds=audio,
            utterances=sum(b.batch_size for b in p.batches),
            padding=p.padding.fractions(),
        )
        progress(
            f"{strategy:9s} {results[strategy].audio_seconds_per_second:7.1f} audio s/s "
            f"(runs: {', '.join(f'{r:.1f}' for r in rates[strategy])}), {len(p.batches)} "
            f"batches, {audio:.0f} s audio, activations {p.memory_bytes / 2**20:.0f} MiB"
        )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="cutset with audio (e.g. the synth corpus)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--preset", default="tiny", help="model preset (speedasr model info)")
    parser.add_argument("--budget-seconds", type=float, default=120.0, help="memory budget (s)")
    parser.add_argument("--steps", type=int, default=8, help="batches timed per strategy")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write results here")
    add_config_overrides(
        parser, {"model": ModelConfig}, "--model.d_model=256 (on top of --preset)",
        deprecated_set_section="model",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from speedasr.data.manifests import load_cuts, validate_cuts
    from speedasr.data.tokenizer import Tokenizer
    from speedasr.models.sizing import preset

    if args.budget_seconds <= 0 or args.steps < 1 or args.repeats < 1:
        raise UserError("--budget-seconds must be > 0, --steps and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(args.tokenizer)
    cuts, report = validate_cuts(load_cuts(args.cuts), max_duration=args.budget_seconds)
    if report.rejected:
        print(f"data: {report.summary()}")
    overrides = args.overrides.section("model")
    overrides.setdefault("attention_backend", "torch" if args.device == "cpu" else "auto")
    try:
        cfg = preset(
            args.preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, **overrides
        )
    except ValueError as e:  # ModelConfig names the conflicting setting
        raise UserError(str(e)) from None
    print(
        f"bench throughput: preset {args.preset}, budget {args.budget_seconds} s, "
        f"{args.steps} batches x {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    results = run_benchmark(
        cuts.to_eager(), tokenizer, cfg, args.budget_seconds, args.steps, args.repeats,
        seed=args.seed, device=args.device,
    )  # fmt: skip
    packed, rnd, b2d = results["packed"], results["random"], results["bucket2d"]
    speed_random = median_paired_ratio(packed.repeats, rnd.repeats)
    speed_2d = median_paired_ratio(packed.repeats, b2d.repeats)
    mem_2d = packed.peak_memory_bytes_per_audio_second / b2d.peak_memory_bytes_per_audio_second
    print(
        f"packed / random: {speed_random:.2f}x; packed / bucket2d: {speed_2d:.2f}x "
        f"(median of per-repeat ratios); "
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
            "settings": {k: v for k, v in vars(args).items() if k != "overrides"}
            | {"model": asdict(cfg)},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0
