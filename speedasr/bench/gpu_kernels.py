"""Steps 1-2 of the GPU check (``speedasr bench gpu``): kernel accuracy and kernel speed.

Each step is a function of a ``StepContext`` run in its own process (``speedasr.bench.gpu_step``),
plus a ``render_*`` function turning its JSON result into markdown. On the GPU they run at the sizes
of ``*_GPU``; the dry run (CPU, Triton interpreter) at ``*_DRY``.

- ``accuracy``: ``speedasr.kernels.accuracy`` on every curated length mix (empty segments,
  cross-attention with different q/k offsets, tile edges), full and causal, forward and the three
  gradients, against the fp32 reference. A case passes when every error is at most 2x that of plain
  PyTorch attention in the same dtype (+1e-4) and finite. The same with relative positions
  (``rel_pos``, NeMo Canary's encoder), against fp64, for the output and all five gradients.
- ``speed``: ``speedasr.kernels.bench.benchmark`` at Canary-like packed shapes: ``utterances``
  durations uniform in ``seconds``, 12.5 encoder frames per second (100 fps features, 8x
  subsampling) and 4 decoder tokens per second after a 4-token prompt. Shapes: encoder
  self-attention (8 heads of 64 and of 128, 16 heads of 64), decoder causal self-attention and
  cross-attention (8 heads of 128, as canary-180m-flash's 1024-wide decoder). Every backend that can
  run here, each in its own call so that one backend's failure costs only its rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from speedasr.bench.gpu_step import StepContext
from speedasr.core.geometry import ENCODER_FRAMES_PER_SECOND, PROMPT_TOKENS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS_PER_SECOND = 4.0  # as speedasr.models.sizing.training_flops_per_audio_second assumes
MISMATCH = 0.1
"""A backend whose output differs from Triton's by more than this (max-abs, on rows that see a key)
fails the speed step: a wrong mask alignment gives differences of order 1, rounding ~1e-2."""


# --- 1. accuracy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccuracySizes:
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    heads: int


ACCURACY_GPU = AccuracySizes(dtypes=("bf16", "fp16"), head_dims=(64, 128), heads=2)
# The interpreter's bf16 tl.dot is wrong, so the dry run checks fp16 (the tests add fp32), at one
# small head dim: the interpreter's time grows with it.
ACCURACY_DRY = AccuracySizes(dtypes=("fp16",), head_dims=(16,), heads=1)


def accuracy(ctx: StepContext) -> None:
    from speedasr.kernels.accuracy import (
        LENGTH_MIXES,
        compare_rel_pos_with_reference,
        compare_with_reference,
    )

    # The reference must really be fp32: no TF32 matmuls behind its back on Ampere and later.
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = ACCURACY_DRY if ctx.dry_run else ACCURACY_GPU
    if ctx.dry_run:
        ctx.skip("bf16", "no GPU (the Triton interpreter's bf16 tl.dot is wrong)")
    _compare_cases(ctx, sizes, LENGTH_MIXES, compare_with_reference, "cases", "")
    # Relative positions: every mix on the GPU, one with empty segments in the (slow) dry run.
    rel_mixes = (
        [m for m in LENGTH_MIXES if m[0] == "len1_and_empty"] if ctx.dry_run else LENGTH_MIXES
    )
    _compare_cases(
        ctx, sizes, rel_mixes, compare_rel_pos_with_reference, "rel_pos_cases", "rel_pos "
    )


def _compare_cases(ctx, sizes, mixes, compare, key: str, label: str) -> None:
    """Runs ``compare`` (kernel vs fp64 reference) for every dtype, head dim, mask and length
    mix; records each case under ``key`` and fails the step on any error over the bound."""
    for dtype, head_dim, causal in itertools.product(sizes.dtypes, sizes.head_dims, (False, True)):
        for mix, len_q, len_k in mixes:
            errors = compare(
                len_q, len_k, head_dim, DTYPES[dtype], causal, seed=0, heads=sizes.heads,
                device=ctx.device,
            )  # fmt: skip
            mask = "causal" if causal else "full"
            ctx.append(
                key,
                {
                    "dtype": dtype, "head_dim": head_dim, "mask": mask, "mix": mix,
                    "passed": all(e.passed for e in errors),
                    "kernel": {e.output: e.kernel for e in errors},
                    "torch": {e.output: e.torch for e in errors},
                },
            )  # fmt: skip
            for e in errors:
                if not e.passed:
                    ctx.fail(
                        f"{label}{dtype} D={head_dim} {mask} {mix}: {e.output} error "
                        f"{e.kernel:.2e} > 2 x {e.torch:.2e} (plain PyTorch) + 1e-4"
                        + ("" if e.finite else ", non-finite values")
                    )


def render_accuracy(results: dict) -> list[str]:
    cases = results.get("cases", [])
    if not cases:
        return []
    lines = [
        "Max-abs error against fp32 over the curated length mixes (`speedasr.kernels.accuracy`), "
        "kernel / plain PyTorch in the same dtype; pass: kernel <= 2 x PyTorch + 1e-4.",
        "",
        *_accuracy_table(cases, ("out", "dq", "dk", "dv")),
    ]
    rel_cases = results.get("rel_pos_cases", [])
    if rel_cases:
        lines += [
            "",
            "With relative positions (`rel_pos`), against fp64, same rule:",
            "",
            *_accuracy_table(rel_cases, ("out", "dq", "dk", "dv", "dquery_pos", "dtable")),
        ]
    return lines


def _accuracy_table(cases: list[dict], outputs: tuple[str, ...]) -> list[str]:
    lines = [
        f"| dtype | D | mask | mixes passed | {' | '.join(outputs)} |",
        "|---|---:|---|---:|" + "---:|" * len(outputs),
    ]
    groups = itertools.groupby(cases, key=lambda c: (c["dtype"], c["head_dim"], c["mask"]))
    for (dtype, head_dim, mask), group in groups:
        group = list(group)
        passed = sum(c["passed"] for c in group)
        cells = [
            f"{max(c['kernel'][o] for c in group):.1e} / {max(c['torch'][o] for c in group):.1e}"
            for o in outputs
        ]
        lines.append(
            f"| {dtype} | {head_dim} | {mask} | {passed}/{len(group)} | {' | '.join(cells)} |"
        )
    return lines


# --- 2. speed ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    name: str
    queries: str  # "encoder" or "decoder" lengths
    keys: str
    heads: int
    head_dims: tuple[int, ...]
    mask: str  # "full" or "causal"


@dataclass(frozen=True)
class SpeedSizes:
    utterances: int
    seconds: tuple[float, float]  # durations, uniform
    dtype: str
    shapes: tuple[AttentionShape, ...]
    reps: int  # CPU timer repetitions (the GPU uses do_bench's 25 ms warm-up, 100 ms timing)


SPEED_GPU = SpeedSizes(
    utterances=64, seconds=(2.0, 30.0), dtype="bf16",
    shapes=(
        AttentionShape("encoder self", "encoder", "encoder", 8, (64, 128), "full"),
        AttentionShape("encoder self", "encoder", "encoder", 16, (64,), "full"),
        AttentionShape("decoder causal", "decoder", "decoder", 8, (128,), "causal"),
        AttentionShape("cross", "decoder", "encoder", 8, (128,), "full"),
    ),
    reps=0,
)  # fmt: skip
# The interpreter's time grows with programs (sequences x heads x tiles): 3 short sequences, 1 head.
SPEED_DRY = SpeedSizes(
    utterances=3, seconds=(0.5, 3.0), dtype="fp32",
    shapes=(
        AttentionShape("encoder self", "encoder", "encoder", 1, (16,), "full"),
        AttentionShape("decoder causal", "decoder", "decoder", 1, (16,), "causal"),
        AttentionShape("cross", "decoder", "encoder", 1, (16,), "full"),
    ),
    reps=1,
)  # fmt: skip


def canary_lengths(sizes: SpeedSizes, seed: int = 0) -> dict[str, list[int]]:
    """Encoder frames and decoder tokens (prompt + text) of ``sizes.utterances`` utterances."""
    gen = torch.Generator().manual_seed(seed)
    low, high = sizes.seconds
    durations = (low + (high - low) * torch.rand(sizes.utterances, generator=gen)).tolist()
    return {
        "encoder": [math.ceil(d * ENCODER_FRAMES_PER_SECOND) for d in durations],
        "decoder": [PROMPT_TOKENS + round(d * TOKENS_PER_SECOND) for d in durations],
    }


def speed(ctx: StepContext) -> None:
    import argparse

    from speedasr.kernels import bench

    sizes = SPEED_DRY if ctx.dry_run else SPEED_GPU
    lengths = canary_lengths(sizes)
    ctx.record(dtype=sizes.dtype, lengths=lengths)
    timer = bench.wall_clock_timer(sizes.reps) if ctx.dry_run else None
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for name in bench.BACKENDS:
        reason = bench.unavailable(name, ctx.device)
        if reason:
            ctx.skip(name, reason)
    backends = [b for b in bench.BACKENDS if not bench.unavailable(b, ctx.device)]
    for shape, backend in itertools.product(sizes.shapes, backends):
        args = parser.parse_args(
            ["--lengths", ",".join(map(str, lengths[shape.queries])),
             "--kv-lengths", ",".join(map(str, lengths[shape.keys])),
             "--heads", str(shape.heads), "--head-dim", *map(str, shape.head_dims),
             "--dtype", sizes.dtype, "--mask", shape.mask, "--backends", backend]
        )  # fmt: skip
        where = f"{shape.name} H={shape.heads} {backend}"
        try:
            rows = bench.benchmark(args, ctx.device, timer)
        except Exception as e:  # one backend's failure costs its rows only
            ctx.fail(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        for row in rows:
            ctx.append("rows", {"shape": shape.name, "heads": shape.heads, **row})
            if row["max_abs_diff"] > MISMATCH:
                ctx.fail(f"{where} D={row['head_dim']}: output differs from Triton by "
                         f"{row['max_abs_diff']:.2e}")  # fmt: skip


def render_speed(results: dict) -> list[str]:
    rows = results.get("rows", [])
    if not rows:
        return []
    enc, dec = results["lengths"]["encoder"], results["lengths"]["decoder"]
    lines = [
        f"{len(enc)} utterances, {results['dtype']}: {sum(enc)} encoder frames (max {max(enc)}), "
        f"{sum(dec)} decoder tokens (max {max(dec)}). TFLOP/s count real query-key pairs only "
        "(`speedasr bench kernels`); max\\|d\\|: output vs Triton.",
        "",
        "| shape | H | D | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| max\\|d\\| |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["shape"], row["heads"], row["head_dim"], row["backend"])
        by_key.setdefault(key, {})[row["mode"]] = row
    for (shape, heads, head_dim, backend), modes in by_key.items():
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            r = modes.get(mode)
            cells += [f"{r['ms']:.3f}", f"{r['tflops']:.1f}"] if r else ["-", "-"]
        diff = max(r["max_abs_diff"] for r in modes.values())
        lines.append(
            f"| {shape} | {heads} | {head_dim} | {backend} | {' | '.join(cells)} | {diff:.1e} |"
        )
    return lines
