"""`speedasr bench kernels`: attention TFLOP/s on real tokens; Triton vs varlen ops vs padded SDPA.

Every backend gets the same batch: one set of sequence lengths, one set of packed q/k/v (the padded
backend gets the same values copied into a zero-padded ``(B, H, L, D)`` layout with a boolean mask,
as a padded model would hold them). Time is the median of ``triton.testing.do_bench``. Throughput
counts only the FLOPs of real (unmasked, unpadded) query-key pairs, so padding and masked-out work
show up as lower TFLOP/s rather than being credited:

    forward FLOPs  = 4 * H * D * sum_i pairs_i   (QK^T and PV, 2 FLOPs per multiply-add)
    backward FLOPs = 2.5 * forward               (5 matmuls instead of 2)

where ``pairs_i`` is ``Lq_i * Lk_i`` (full) or the number of visible pairs under the bottom-right
causal mask. Before timing, each backend's output is compared with the Triton output on the real
rows and the max-abs difference is printed, so a fast wrong kernel cannot go unnoticed.

Backends: ``triton`` (this kernel), ``flash_attn`` (``flash_attn_varlen_func``, if installed),
``torch_varlen`` (``torch.nn.attention.varlen.varlen_attn``, where this torch has it) and
``sdpa_padded``; one that cannot run here is listed as skipped, with the reason.

Needs a CUDA GPU (it exits with an error otherwise). Example (see docs/kernels.md):

    speedasr bench kernels --tokens 32768 --heads 16 --head-dim 64 128 --dtype bfloat16 \
        --mask full causal --mode fwd fwd_bwd --json kernels.json
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from speedasr.errors import UserError
from speedasr.extras import require
from speedasr.options import add_dtype_argument

BACKENDS = ("triton", "flash_attn", "torch_varlen", "sdpa_padded")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("sequence lengths (one batch; default: synthetic long tail)")
    src.add_argument("--lengths", help="comma-separated query lengths, e.g. 1,17,300,1200")
    src.add_argument("--kv-lengths", help="comma-separated key lengths (cross-attention)")
    src.add_argument(
        "--lengths-file",
        help="text file with one length per line, or a TSV with a duration_seconds column "
        "(e.g. ../shared/data/real_lengths/*.tsv.gz), converted with --frames-per-second",
    )
    src.add_argument(
        "--frames-per-second", type=float, default=12.5, help="100 fps / 8x subsampling"
    )
    src.add_argument("--tokens", type=int, default=16384, help="query tokens per batch")
    src.add_argument("--max-len", type=int, default=2048, help="longest synthetic sequence")
    src.add_argument("--seed", type=int, default=0)
    shape = parser.add_argument_group("attention shape")
    shape.add_argument("--heads", type=int, default=16)
    shape.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    add_dtype_argument(shape, "bfloat16", "default bfloat16; bf16, fp16, fp32 also accepted")
    shape.add_argument("--mask", choices=("full", "causal"), nargs="+", default=["full", "causal"])
    run_ = parser.add_argument_group("what to time")
    run_.add_argument("--mode", choices=("fwd", "fwd_bwd"), nargs="+", default=["fwd", "fwd_bwd"])
    run_.add_argument("--backends", choices=BACKENDS, nargs="+", default=list(BACKENDS))
    run_.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    run_.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    run_.add_argument("--json", help="also write the results table to this JSON file")


# ----------------------------------------------------------------------------------------------
# Lengths and FLOPs (pure Python / CPU; unit-tested)
# ----------------------------------------------------------------------------------------------


def synthetic_lengths(tokens: int, max_len: int, seed: int) -> list[int]:
    """Long-tailed lengths (log-normal, median ~max_len/8) summing to ``tokens``."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    median = max(1.0, max_len / 8)
    while sum(lengths) < tokens:
        draw = math.exp(math.log(median) + 0.8 * torch.randn((), generator=gen).item())
        lengths.append(max(1, min(max_len, round(draw), tokens - sum(lengths))))
    return lengths


def read_lengths(path: str, frames_per_second: float) -> list[int]:
    """One int per line, or a (gzipped) TSV with a ``duration_seconds`` column."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            first = f.readline()
            if "duration_seconds" in first:
                header = first.rstrip("\n").split("\t")
                rows = csv.DictReader(f, fieldnames=header, delimiter="\t", quoting=csv.QUOTE_NONE)
                secs = [float(r["duration_seconds"]) for r in rows]
                return [max(1, math.ceil(s * frames_per_second)) for s in secs]
            return [int(line) for line in [first, *f] if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read lengths from '{path}': {e}") from None


def sample_batch(lengths: list[int], tokens: int, seed: int) -> list[int]:
    """Random utterances (without replacement) until ``tokens`` query tokens: one packed batch."""
    if not lengths:
        raise UserError("the lengths file has no lengths")
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batch: list[int] = []
    for i in order:
        if batch and sum(batch) + lengths[i] > tokens:
            break
        batch.append(lengths[i])
    return batch


def visible_pairs(len_q: int, len_k: int, causal: bool) -> int:
    """Query-key pairs a sequence really computes (bottom-right causal when ``causal``)."""
    if not causal:
        return len_q * len_k
    diag = len_k - len_q  # query j sees keys 0..j+diag, clamped to [0, len_k]
    return sum(min(len_k, max(0, j + diag + 1)) for j in range(len_q))


def attention_flops(lengths_q, lengths_k, heads, head_dim, causal, mode) -> float:
    pairs = sum(visible_pairs(a, b, causal) for a, b in zip(lengths_q, lengths_k, strict=True))
    fwd = 4.0 * heads * head_dim * pairs
    return fwd if mode == "fwd" else 3.5 * fwd


# ----------------------------------------------------------------------------------------------
# Inputs and backends
# ----------------------------------------------------------------------------------------------


def _offsets(lengths: list[int], device) -> torch.Tensor:
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def pad(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Packed ``(total, H, D)`` -> zero-padded ``(B, H, max(lengths), D)``."""
    out = x.new_zeros(len(lengths), max(lengths, default=0), *x.shape[1:])
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n] = x[start : start + n]
        start += n
    return out.transpose(1, 2)


def unpad(x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``(B, H, L, D)`` -> packed ``(total, H, D)``."""
    x = x.transpose(1, 2)
    return torch.cat([x[i, :n] for i, n in enumerate(lengths)])


def padded_mask(lengths_q: list[int], lengths_k: list[int], causal: bool, device) -> torch.Tensor:
    """Boolean ``(B, 1, Lq, Lk)`` mask for padded SDPA, True = attend.

    Query rows that see no key (padding rows; causal rows before the first key) get one visible
    dummy key so SDPA does not produce NaN for them; their outputs are never compared.
    """
    rows = torch.arange(max(lengths_q), device=device)[:, None]
    cols = torch.arange(max(lengths_k), device=device)[None, :]
    masks = []
    for lq, lk in zip(lengths_q, lengths_k, strict=True):
        visible = (rows < lq) & (cols < lk)
        if causal:
            visible &= cols <= rows + (lk - lq)
        visible[:, 0] |= ~visible.any(1)
        masks.append(visible)
    return torch.stack(masks)[:, None]


def rows_with_keys(lengths_q: list[int], lengths_k: list[int], causal: bool) -> torch.Tensor:
    """Boolean ``(total_q,)``: queries that see at least one key (the rows compared)."""
    rows = []
    for lq, lk in zip(lengths_q, lengths_k, strict=True):
        rows.append(torch.arange(lq) + (lk - lq) >= 0 if causal else torch.full((lq,), lk > 0))
    return torch.cat(rows)


@dataclass
class Prepared:
    """One backend ready to run on one batch."""

    run: Callable[[], torch.Tensor]  # computes the output in the backend's own layout
    leaves: list[torch.Tensor]  # inputs whose .grad the backward fills (reset between reps)
    grad_out: torch.Tensor  # output gradient in the backend's layout
    to_packed: Callable[[torch.Tensor], torch.Tensor]  # output -> (total_q, H, D)


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None if it can."""
    if name in ("flash_attn", "torch_varlen") and device.type != "cuda":
        return "needs CUDA"
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "flash-attn not installed"
    if name == "torch_varlen" and _torch_varlen_attn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    # Causal is the (-1, 0) window, which flash-attention aligns bottom-right like our kernel;
    # the output cross-check against Triton would show any other alignment.
    window = (-1, 0) if causal else (-1, -1)
    return _torch_varlen_attn()(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window)


def prepare(name, q, k, v, grad, lengths_q, lengths_k, causal, backward) -> Prepared:
    """Set a backend up on the same packed inputs (check ``unavailable`` first)."""
    cu_q, cu_k = _offsets(lengths_q, q.device), _offsets(lengths_k, q.device)
    max_q, max_k = max(lengths_q), max(lengths_k)
    if name == "sdpa_padded":
        # A padded model holds padded activations, so padding is done here, outside the timing.
        qp, kp, vp = (pad(t, n).requires_grad_(backward) for t, n in
                      ((q, lengths_q), (k, lengths_k), (v, lengths_k)))  # fmt: skip
        mask = padded_mask(lengths_q, lengths_k, causal, q.device)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return Prepared(
            run=lambda: sdpa(qp, kp, vp, attn_mask=mask),
            leaves=[qp, kp, vp],
            grad_out=pad(grad, lengths_q),
            to_packed=lambda out: unpad(out, lengths_q),
        )
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    if name == "triton":
        from speedasr.kernels.flash_varlen import flash_attn_varlen as fn
    elif name == "flash_attn":
        from flash_attn import flash_attn_varlen_func as fn
    elif name == "torch_varlen":
        fn = _torch_varlen
    else:
        raise ValueError(f"unknown backend {name!r}")
    return Prepared(
        run=lambda: fn(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal),
        leaves=[q, k, v],
        grad_out=grad,
        to_packed=lambda out: out,
    )


def _parse_lengths(text: str, flag: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got '{text}'") from None
    if min(lengths) < 1:
        raise UserError(f"{flag} lengths must be >= 1, got '{text}'")
    return lengths


def _lengths(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    if args.lengths:
        lengths_q = _parse_lengths(args.lengths, "--lengths")
    elif args.lengths_file:
        lengths_q = sample_batch(
            read_lengths(args.lengths_file, args.frames_per_second), args.tokens, args.seed
        )
    else:
        lengths_q = synthetic_lengths(args.tokens, args.max_len, args.seed)
    lengths_k = _parse_lengths(args.kv_lengths, "--kv-lengths") if args.kv_lengths else lengths_q
    if len(lengths_k) != len(lengths_q):
        raise UserError(f"{len(lengths_q)} query lengths but {len(lengths_k)} key lengths")
    return lengths_q, lengths_k


Timer = Callable[[Callable[[], object], list[torch.Tensor]], float]
"""``timer(fn, leaves)``: median milliseconds of ``fn()``, resetting ``leaves``' gradients."""


def do_bench_timer(warmup_ms: int, rep_ms: int) -> Timer:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed between calls): the GPU timer."""

    def time_ms(fn, leaves):
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves, return_mode="median")

    return time_ms


def wall_clock_timer(reps: int) -> Timer:
    """Median of ``reps`` wall-clock calls after one warm-up: the CPU stand-in (dry runs)."""

    def time_ms(fn, leaves):
        seconds = []
        for _ in range(reps + 1):
            for t in leaves:
                t.grad = None
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return 1e3 * statistics.median(seconds[1:])

    return time_ms


def _time(case: Prepared, backward: bool, timer: Timer) -> float:
    """Median milliseconds of one forward (or forward + backward) call."""

    def fwd_bwd() -> None:
        case.run().backward(case.grad_out)

    return timer(fwd_bwd if backward else case.run, case.leaves)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise UserError("bench kernels needs a CUDA GPU (none visible to torch)")
    require("triton", "bench kernels")
    benchmark(args, torch.device("cuda"))
    return 0


def benchmark(
    args: argparse.Namespace, device: torch.device, timer: Timer | None = None
) -> list[dict]:
    """Print the results table (and write ``--json``); returns its rows (backends that ran).

    ``device`` is CUDA from the CLI, timed with ``do_bench``; the tests and the GPU check's dry
    run use it on CPU under TRITON_INTERPRET=1 with a stand-in ``timer``.
    """
    timer = timer or do_bench_timer(args.warmup, args.rep)
    lengths_q, lengths_k = _lengths(args)
    dtype = DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    real = sum(a * b for a, b in zip(lengths_q, lengths_k, strict=True))
    padded = len(lengths_q) * max(lengths_q) * max(lengths_k)
    print(
        f"batch: {len(lengths_q)} sequences, {sum(lengths_q)} query / {sum(lengths_k)} key tokens, "
        f"max {max(lengths_q)}/{max(lengths_k)}; the padded layout wastes {1 - real / padded:.1%} "
        f"of full-attention pairs; {gpu}, {args.dtype}"
    )
    columns = f"{'backend':<12} {'D':>4} {'mask':<7} {'mode':<8} {'ms':>9} {'TFLOP/s':>8}"
    print(f"{columns} {'max|d|':>9}")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    results = []
    for head_dim in args.head_dim:
        # One set of inputs per head dim, shared by every backend, mask and mode.
        shapes = [(sum(n), args.heads, head_dim) for n in (lengths_q, lengths_k, lengths_k)]
        q, k, v = (torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes)
        grad = torch.randn(shapes[0], device=device, dtype=dtype, generator=gen)
        for mask, mode, name in itertools.product(args.mask, args.mode, args.backends):
            causal, backward = mask == "causal", mode == "fwd_bwd"
            reason = unavailable(name, device)
            if reason:
                print(f"{name:<12} skipped: {reason}")
                continue
            case = prepare(name, q, k, v, grad, lengths_q, lengths_k, causal, backward)
            # Same inputs, so outputs must agree on every query that sees a key.
            expected = prepare("triton", q, k, v, grad, lengths_q, lengths_k, causal, False).run()
            with torch.no_grad():
                out = case.to_packed(case.run())
            compared = rows_with_keys(lengths_q, lengths_k, causal).to(device)
            diff = (out - expected)[compared].abs().max().item() if compared.any() else 0.0
            ms = _time(case, backward, timer)
            flops = attention_flops(lengths_q, lengths_k, args.heads, head_dim, causal, mode)
            tflops = flops / (ms * 1e-3) / 1e12
            results.append(dict(backend=name, head_dim=head_dim, mask=mask, mode=mode, ms=ms,
                                tflops=tflops, max_abs_diff=diff))  # fmt: skip
            print(
                f"{name:<12} {head_dim:>4} {mask:<7} {mode:<8} {ms:>9.3f} {tflops:>8.1f} "
                f"{diff:>9.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"lengths_q": lengths_q, "lengths_k": lengths_k, "results": results}, f)
    return results
