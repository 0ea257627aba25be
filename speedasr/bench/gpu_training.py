"""Steps data and 3-5 of the GPU check (``speedasr bench gpu``): training throughput with NVML,
calibration, and an FSDP smoke run. Each step is a function of a ``StepContext`` run in its own
process (``speedasr.bench.gpu_step``), with a ``render_*`` function for its markdown.

- ``make_data``: the eSpeak corpus (``speedasr data synth``) and a 256-token tokenizer, in the
  check's work directory.
- ``training``: ``speedasr bench throughput``'s pieces (``prepare_strategy``, ``run_interleaved``)
  for packed vs padded-random vs padded-2D with torch attention, and packed with Triton attention:
  same initial weights, same budget, passes interleaved across all four configurations, ratios as
  medians of per-pass ratios. The canary-180m-flash preset in bf16-mixed precision (autocast).
  MFU: the real content's training FLOPs (``speedasr.models.sizing.count_flops``, as
  SpeechThroughputMonitor counts them, at the corpus's mean FLOPs per audio second) per second
  over the card's dense bf16 peak (``BF16_PEAK_FLOPS``, else Lightning's table, else n/a). NVML
  (step 4) samples utilization and memory over the timed passes through ``GPUSampler`` +
  ``NvmlSource``, the parts ``GPUUtilizationMonitor`` is made of (the callback itself needs a
  Lightning Trainer; it runs for real in ``fsdp``).
- ``calibrate``: ``speedasr.train.calibrate``'s search (bf16-mixed, packed) for 2 buckets.
- ``fsdp``: ``speedasr train`` with ``trainer.strategy=fsdp`` on one GPU for 5 steps with every
  monitor on; GPUUtilizationMonitor's and SpeechThroughputMonitor's logged metrics are reported.
"""

from __future__ import annotations

import csv
import math
import os
import resource
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from speedasr.bench.gpu_step import StepContext

# Dense (not "with sparsity") bf16 tensor-core peaks per GPU, NVIDIA's H100/H200 datasheets. The
# first key contained in the device name wins. Lightning's table lists H200 and H100 NVL at twice
# these (sparse or two-GPU figures), and matches no plain "NVIDIA H200".
BF16_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
}


@dataclass(frozen=True)
class TrainingSizes:
    corpus_hours: float  # eSpeak corpus, train split
    model: str  # "canary-180m-flash" or "tiny-test"
    precision: str  # Lightning's: "bf16-mixed" (autocast) or "32-true"
    configs: tuple[tuple[str, str], ...]  # (attention backend, batching strategy), interleaved
    budget_seconds: float  # audio per batch (padded: B x longest)
    steps: int  # batches per strategy
    repeats: int
    calibrate_buckets: tuple[tuple[float, int], ...]  # (seconds, tokens) upper edges
    calibrate_max_batch: int
    fsdp_steps: int


# Padded layouts run dense torch attention whatever the backend, so Triton only changes packed.
CONFIGS = (("torch", "random"), ("torch", "bucket2d"), ("torch", "packed"), ("triton", "packed"))
GPU = TrainingSizes(
    corpus_hours=0.6, model="canary-180m-flash", precision="bf16-mixed", configs=CONFIGS,
    budget_seconds=400.0, steps=4, repeats=5,
    calibrate_buckets=((10.0, 44), (30.0, 124)), calibrate_max_batch=256, fsdp_steps=5,
)  # fmt: skip
# fp32 on CPU: the Triton interpreter's bf16 tl.dot is wrong, and 16-bit matmuls are slow on CPUs.
DRY = TrainingSizes(
    corpus_hours=0.02, model="tiny-test", precision="32-true", configs=CONFIGS,
    budget_seconds=5.0, steps=1, repeats=1, calibrate_buckets=((1.0, 8), (2.0, 12)),
    calibrate_max_batch=4, fsdp_steps=3,
)  # fmt: skip
# d 32, 1 + 1 layers, 1 head: the interpreter runs the attention of every batch, at a cost per
# program (sequence x head x tile).
TINY_TEST_MODEL = dict(
    d_model=32, encoder_layers=1, encoder_heads=1, decoder_layers=1, subsampling_channels=8
)


def _sizes(ctx: StepContext) -> TrainingSizes:
    return DRY if ctx.dry_run else GPU


def model_config(sizes: TrainingSizes, backend: str, pad_id: int = 0):
    """The benchmarked model with ``backend`` attention. Canary's vocabulary size stays (the
    tokenizer's ids fit in it), so the output layer costs what it does in Canary."""
    from speedasr.models.aed import ModelConfig
    from speedasr.models.sizing import preset

    cfg = ModelConfig(**TINY_TEST_MODEL) if sizes.model == "tiny-test" else preset(sizes.model)
    return replace(cfg, attention_backend=backend, pad_id=pad_id)


# --- data ----------------------------------------------------------------------------------------


def make_data(ctx: StepContext) -> None:
    from lhotse import CutSet

    from speedasr.data.tokenizer import Tokenizer
    from speedasr.prep.corpus import synthesize_corpus

    sizes = _sizes(ctx)
    workers = max(1, min(16, os.cpu_count() or 1))
    corpus = synthesize_corpus(
        ctx.work / "corpus", hours=sizes.corpus_hours, seed=0, workers=workers,
        min_eval_utterances=4, progress=False,
    )  # fmt: skip
    texts = [s.text for c in CutSet.from_file(corpus["train"]) for s in c.supervisions if s.text]
    tokenizer = Tokenizer.train(texts, ctx.work / "tokenizer", vocab_size=256)
    ctx.record(train=corpus["stats"]["splits"]["train"], vocab_size=tokenizer.vocab_size)


def render_data(results: dict) -> list[str]:
    t = results.get("train")
    if not t:
        return []
    return [
        f"eSpeak corpus, train split: {t['utterances']} utterances, {t['hours']:.2f} h; duration "
        f"median {t['median']:.1f} s, p95 {t['p95']:.1f} s, max {t['max']:.1f} s; tokenizer "
        f"{results['vocab_size']} tokens."
    ]


def _data(ctx: StepContext):
    from speedasr.data.manifests import load_cuts
    from speedasr.data.tokenizer import Tokenizer

    cuts = load_cuts(ctx.work / "corpus" / "train_cuts.jsonl.gz")
    return cuts, Tokenizer.load(ctx.work / "tokenizer")


# --- 3-4. training throughput and NVML -----------------------------------------------------------


def flops_per_audio_second(cuts, tokenizer, cfg) -> float:
    """Training FLOPs of the corpus's real content per second of audio."""
    from speedasr.core.geometry import num_input_frames
    from speedasr.data.bucketing import TokenCounter
    from speedasr.models.sizing import count_flops

    tokens = TokenCounter(tokenizer)
    flops = sum(count_flops(cfg, num_input_frames(c.duration), tokens(c)).training for c in cuts)
    return flops / sum(c.duration for c in cuts)


def training(ctx: StepContext) -> None:
    from speedasr.bench.paired import median_paired_ratio, run_interleaved
    from speedasr.bench.throughput import prepare_strategy
    from speedasr.data.manifests import validate_cuts
    from speedasr.models.aed import AEDModel
    from speedasr.models.sizing import count_parameters
    from speedasr.profile.flops import compute_dtype, peak_flops

    sizes, device = _sizes(ctx), ctx.device
    cuts, tokenizer = _data(ctx)
    cuts, report = validate_cuts(cuts, max_duration=sizes.budget_seconds)  # as the bench's CLI
    cuts = cuts.to_eager()
    peak, why = peak_flops(device, sizes.precision, BF16_PEAK_FLOPS)
    configs = {key: model_config(sizes, key[0], pad_id=tokenizer.pad_id) for key in sizes.configs}
    cfg = next(iter(configs.values()))
    ctx.record(
        data=report.summary(), model=sizes.model, parameters=count_parameters(cfg).total,
        precision=sizes.precision, budget_seconds=sizes.budget_seconds, steps=sizes.steps,
        repeats=sizes.repeats, peak_flops=peak, peak_unknown=why,
    )  # fmt: skip
    flops = flops_per_audio_second(cuts, tokenizer, cfg)
    torch.manual_seed(0)
    initial = AEDModel(cfg).state_dict()  # every configuration starts from the same weights
    # Lightning's "bf16-mixed" is this autocast: weights and optimizer in fp32, matmuls in bf16.
    mixed = sizes.precision.endswith("-mixed")
    with torch.autocast(device.type, dtype=compute_dtype(sizes.precision), enabled=mixed):
        prepared = {}
        for (backend, strategy), model_cfg in configs.items():
            print(f"preparing {strategy} with {backend} attention", flush=True)
            prepared[backend, strategy] = prepare_strategy(
                strategy, cuts, tokenizer, model_cfg, initial, sizes.budget_seconds, sizes.steps,
                seed=0, device=device,
            )  # fmt: skip
        # NVML samples the timed passes only (not the collation on the CPU before them).
        sampler = None if ctx.dry_run else _start_nvml(device)
        try:
            rates = run_interleaved({k: p.timer for k, p in prepared.items()}, sizes.repeats)
        finally:
            nvml = _stop_nvml(sampler) if sampler is not None else None
    if nvml is None:
        ctx.skip("NVML (step 4)", "no GPU")
    else:
        ctx.record(nvml=nvml)
    for (backend, strategy), p in prepared.items():
        rate = statistics.median(rates[backend, strategy])
        ctx.append(
            "configs",
            {
                "backend": backend, "strategy": strategy, "audio_seconds_per_second": rate,
                "repeats": rates[backend, strategy], "peak_memory_gib": p.memory_bytes / 2**30,
                "audio_seconds_per_batch": p.timer.audio_seconds / len(p.batches),
                "padding_frames": p.padding.fractions()["padding_frames"],
                "mfu": rate * flops / peak if peak else None,
            },
        )  # fmt: skip
    ratios = {
        f"{a[1]} {a[0]} / {b[1]} {b[0]}": median_paired_ratio(rates[a], rates[b])
        for a, b in RATIOS
        if a in rates and b in rates
    }
    ctx.record(ratios=ratios)


# Paired speed ratios reported, ((backend, strategy), (backend, strategy)).
RATIOS = (
    (("torch", "packed"), ("torch", "random")),
    (("torch", "packed"), ("torch", "bucket2d")),
    (("triton", "packed"), ("torch", "packed")),
)


def _start_nvml(device: torch.device):
    from speedasr.profile.gpu import GPUSampler, NvmlSource

    sampler = GPUSampler(NvmlSource(device.index or 0), interval=0.1)
    sampler.start()
    return sampler


def _stop_nvml(sampler) -> dict:
    sampler.stop()
    sampler.source.close()
    return sampler.flush()


def render_training(results: dict) -> list[str]:
    rows = results.get("configs", [])
    if not rows:
        return []
    peak = results["peak_flops"]
    lines = [
        f"{results['model']} ({results['parameters'] / 1e6:.1f}M parameters), "
        f"{results['precision']}, budget {results['budget_seconds']:.0f} s of audio per batch, "
        f"{results['steps']} batches per configuration, {results['repeats']} passes interleaved "
        "across configurations (`speedasr.bench.throughput.prepare_strategy`; padded layouts use "
        "dense torch attention whatever the backend). MFU against "
        + (f"{peak / 1e12:.0f} TFLOP/s." if peak else f"n/a ({results['peak_unknown']})."),
        "",
        "| attention | strategy | audio s/s (passes) | audio s/batch | peak memory GiB | "
        "padding frames | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs = ", ".join(f"{x:.0f}" for x in r["repeats"])
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(
            f"| {r['backend']} | {r['strategy']} | {r['audio_seconds_per_second']:.1f} ({runs}) "
            f"| {r['audio_seconds_per_batch']:.0f} | {r['peak_memory_gib']:.2f} "
            f"| {100 * r['padding_frames']:.0f}% | {mfu} |"
        )
    ratios = results.get("ratios", {})
    if ratios:
        lines += ["", "Median per-pass ratios: " + "; ".join(
            f"{k}: {v:.2f}x" for k, v in ratios.items())]  # fmt: skip
    n = results.get("nvml")
    if n:
        lines += [
            "",
            f"NVML over the timed passes (`GPUSampler` + `NvmlSource`, every 0.1 s, "
            f"{n['gpu/samples']:.0f} samples): utilization mean {n['gpu/utilization_mean']:.0f}%, "
            f"min {n['gpu/utilization_min']:.0f}%; memory used mean "
            f"{n['gpu/memory_used_gib']:.1f} GiB, peak {n['gpu/memory_peak_gib']:.1f} GiB.",
        ]
    return lines


# --- 5a. calibrate -------------------------------------------------------------------------------


def calibrate(ctx: StepContext) -> None:
    from speedasr.core.geometry import PROMPT_TOKENS
    from speedasr.train.calibrate import (
        Calibrator,
        CpuMemoryLimit,
        CudaMemoryLimit,
        calibrate_buckets,
    )
    from speedasr.train.module import OptimConfig

    sizes, device = _sizes(ctx), ctx.device
    if ctx.dry_run:
        # The whole process may grow by 1 GiB: the tiny batches fit, so the search runs to the cap.
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        limit = CpuMemoryLimit(peak_rss + 2**30)
        backend, text = "torch", "process peak RSS + 1 GiB (CPU)"
    else:
        limit, backend, text = CudaMemoryLimit(device, 0.9), "auto", "CUDA OOM at 0.9 of memory"
    cfg = model_config(sizes, backend)
    ctx.record(
        model=sizes.model,
        precision=sizes.precision,
        limit=text,
        max_batch=sizes.calibrate_max_batch,
    )
    # The benchmark trains with speedasr's own tokenizer (make_data), so its prompt length.
    calibrator = Calibrator(
        cfg, OptimConfig(), "packed", device, limit, sizes.precision, PROMPT_TOKENS
    )
    fits = calibrator.fits

    def recorded_fits(duration: float, tokens: int, batch_size: int):
        ok, peak = fits(duration, tokens, batch_size)
        ctx.append("trials", {"seconds": duration, "tokens": tokens, "batch": batch_size,
                              "fits": ok, "peak_gib": peak / 2**30})  # fmt: skip
        return ok, peak

    calibrator.fits = recorded_fits  # every trial is kept, even if the step runs out of time
    buckets = calibrate_buckets(
        calibrator, list(sizes.calibrate_buckets), sizes.calibrate_max_batch, gap=0.1
    )
    ctx.record(buckets=[asdict(b) for b in buckets])


def render_calibrate(results: dict) -> list[str]:
    trials = results.get("trials", [])
    lines = [
        f"{results.get('model')}, {results.get('precision')}, packed; limit: "
        f"{results.get('limit')}; batch capped at {results.get('max_batch')}; "
        f"{len(trials)} trials.",
        "",
    ]
    if results.get("buckets"):
        lines += ["| bucket | seconds | tokens | batch | peak GiB | trials |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for b in results["buckets"]:
            peak = "-" if b["peak_gib"] is None else f"{b['peak_gib']:.2f}"
            lines.append(
                f"| {b['bucket']} | {b['duration']:.0f} | {b['tokens']} | {b['batch_size']} "
                f"| {peak} | {b['trials']} |"
            )
    elif trials:
        last = trials[-1]
        lines.append(f"Last trial: {last['seconds']} s x {last['batch']}, fits {last['fits']}.")
    return lines


# --- 5b. FSDP ------------------------------------------------------------------------------------

LOGGED = (
    "train/loss", "gpu/utilization_mean", "gpu/memory_peak_gib", "gpu/torch_peak_allocated_gib",
    "throughput/audio_seconds_per_sec", "throughput/mfu",
)  # fmt: skip


def fsdp(ctx: StepContext) -> None:
    import yaml

    from speedasr.train.run import main as train_main

    sizes = _sizes(ctx)
    cfg = model_config(sizes, "auto")
    trainer = dict(max_steps=sizes.fsdp_steps, devices=1, enable_progress_bar=False,
                   log_every_n_steps=1, num_sanity_val_steps=0)  # fmt: skip
    if ctx.dry_run:
        ctx.skip("FSDP", "no GPU (Lightning's FSDP is CUDA only): the same run with strategy=ddp")
        ctx.skip("GPUUtilizationMonitor, MFU", "no GPU")
        trainer.update(accelerator="cpu", strategy="ddp", precision=sizes.precision)
    else:
        trainer.update(accelerator="gpu", strategy="fsdp", precision=sizes.precision)
    config = {
        "model": {k: v for k, v in asdict(cfg).items() if k not in ("vocab_size", "pad_id")},
        "sampler": {"mode": "packed", "max_duration": sizes.budget_seconds,
                    "num_buckets": 2, "num_token_buckets": 1},
        "trainer": trainer,
        "data": {"train_cuts": str(ctx.work / "corpus" / "train_cuts.jsonl.gz"),
                 "tokenizer": str(ctx.work / "tokenizer"),
                 "num_workers": 0 if ctx.dry_run else 2},
        "monitors": {"padding": True, "gpu": True, "throughput": True},
        "checkpoint": {"overwrite": True},  # a rerun with the same --work starts anew
    }  # fmt: skip
    out_dir = ctx.work / "fsdp"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ctx.record(strategy=trainer["strategy"], precision=trainer["precision"], model=sizes.model)
    code = train_main(["--config", str(out_dir / "config.yaml"), "--out_dir", str(out_dir)])
    logged = last_logged(out_dir)
    ctx.record(exit_code=code, **logged)
    steps = logged.get("steps", 0)
    if code != 0 or steps < sizes.fsdp_steps:
        ctx.fail(f"training exited {code} after {steps} of {sizes.fsdp_steps} steps")
    elif not math.isfinite(logged.get("train/loss", math.nan)):
        ctx.fail(f"training loss is {logged.get('train/loss')}")


def last_logged(out_dir: Path) -> dict[str, float]:
    """Steps taken and the last logged value of each ``LOGGED`` metric (Lightning's CSV log,
    written every step: ``log_every_n_steps=1``)."""
    found: dict[str, float] = {"steps": 0}
    for path in sorted(out_dir.glob("logs/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                found["steps"] += bool(row.get("train/loss"))  # logged every step
                found.update({k: float(row[k]) for k in LOGGED if row.get(k)})
    return found


def render_fsdp(results: dict) -> list[str]:
    if "exit_code" not in results:
        return []
    lines = [
        f"`speedasr train` {results['model']}, strategy {results['strategy']}, precision "
        f"{results['precision']}: exit code {results['exit_code']}, {results.get('steps', 0)} "
        "steps; last logged values:",
        "",
    ]
    lines += [f"- `{k}`: {results[k]:.4g}" for k in LOGGED if k in results]
    missing = [k for k in LOGGED if k not in results]
    if missing:
        lines.append(f"- not logged: {', '.join(f'`{k}`' for k in missing)}")
    return lines
