"""`speedasr calibrate`: the largest batch per 2D bucket (and the packed budget) that fits memory.

The OOMptimizer idea: instead of guessing ``max_duration``, run real training steps (forward,
backward, AdamW step) on synthetic worst-case batches of each bucket's shape (every utterance at
the bucket's upper duration and token edges) and search the batch size:

* **Order.** Largest bucket first (flat index descending). A bucket whose shape is dominated by an
  already calibrated one (shorter *and* fewer tokens) fits at least that one's batch, so its search
  starts there: results are monotone non-increasing along dominance, and searches are short.
* **Search.** Double the batch until a step does not fit (or ``--max-batch``), then bisect until
  the gap between the largest fitting and the smallest failing size is at most ``--gap`` (5%).
* **Limit.** CUDA: out-of-memory under ``torch.cuda.set_per_process_memory_fraction`` (the peak of
  the caching allocator is reported). CPU: the process's peak resident memory (``VmHWM``, reset
  before each trial through ``/proc/self/clear_refs``) must stay within ``--memory-budget`` GiB;
  the heap is trimmed (``malloc_trim``) before each trial so that memory freed by an earlier,
  larger trial does not count against the next one. Budget the whole training process:
  interpreter, model, optimizer state and one batch, plus ``--reserve`` for data loading.

Output (``--out``, YAML) is a config fragment that training reads after its own config:
``speedasr train --config run.yaml --config calibrated.yaml``. It sets ``sampler.batch_sizes``
(bucket2d) or ``sampler.max_duration`` (packed: the smallest per-bucket budget
``batch × cost(d, L)``), with the bins it was made for. ``--json`` writes the measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from speedasr.core.geometry import FRAMES_PER_SECOND, GIB
from speedasr.errors import UserError
from speedasr.options import add_config_overrides, dataclass_sections
from speedasr.train.host_memory import release_free_heap

log = logging.getLogger(__name__)

"""Input feature frames per second (10 ms shift)."""


@dataclass
class BucketResult:
    bucket: int
    duration: float
    """Upper duration edge of the bucket (seconds); every synthetic utterance has this length."""
    tokens: int
    """Upper token edge (prompt + text); every synthetic utterance has this many tokens."""
    batch_size: int
    peak_gib: float | None
    """Memory peak of the largest fitting trial (CPU: process RSS; CUDA: allocator); None when
    the size was inherited from a dominating bucket at ``--max-batch`` without a trial."""
    trials: int


# --- memory limits -----------------------------------------------------------------------------


class MemoryLimit:
    """Runs one trial and says whether it fitted, and its peak (bytes)."""

    def __call__(self, step: Callable[[], None]) -> tuple[bool, int]:
        raise NotImplementedError


class CpuMemoryLimit(MemoryLimit):
    """Process peak RSS within ``budget`` bytes (Linux: /proc/self/status VmHWM)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        if not Path("/proc/self/clear_refs").exists():
            raise UserError("CPU calibration needs Linux (/proc/self/clear_refs, VmHWM)")

    @staticmethod
    def _hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    def _trim(self) -> None:
        gc.collect()
        release_free_heap()  # freed heap pages go back to the OS between trials

    def __call__(self, step: Callable[[], None]) -> tuple[bool, int]:
        self._trim()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
        try:
            step()
        except MemoryError:
            self._trim()
            return False, self.budget + 1
        peak = self._hwm()
        self._trim()
        return peak <= self.budget, peak


class CudaMemoryLimit(MemoryLimit):
    """No out-of-memory error with the caching allocator capped at ``fraction`` of the device."""

    def __init__(self, device: torch.device, fraction: float) -> None:
        self.device = device
        torch.cuda.set_per_process_memory_fraction(fraction, device)

    def __call__(self, step: Callable[[], None]) -> tuple[bool, int]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            step()
            torch.cuda.synchronize(self.device)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        peak = torch.cuda.max_memory_allocated(self.device)
        gc.collect()
        torch.cuda.empty_cache()
        return ok, peak


# --- trials --------------------------------------------------------------------------------------


def synthetic_batch(
    duration: float, tokens: int, batch_size: int, cfg, layout: str, prompt_tokens: int
):
    """``batch_size`` utterances of ``duration`` seconds and ``tokens`` decoder tokens each, the
    first ``prompt_tokens`` of them a prompt (the tokenizer's length: no loss on it)."""
    from speedasr.core.batch import IGNORE_INDEX, PackedBatch
    from speedasr.core.segments import Segments

    frames = max(1, math.ceil(duration * FRAMES_PER_SECOND))
    tokens = max(tokens, prompt_tokens + 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch_size * tokens,), generator=g)
    targets = torch.roll(ids, -1).view(batch_size, tokens)
    targets[:, : prompt_tokens - 1] = IGNORE_INDEX
    batch = PackedBatch(
        features=torch.randn(batch_size * frames, cfg.n_mels, generator=g),
        feature_segments=Segments.from_lengths([frames] * batch_size),
        tokens=ids,
        targets=targets.reshape(-1),
        token_segments=Segments.from_lengths([tokens] * batch_size),
        prompt_lengths=(prompt_tokens,) * batch_size,
        cut_ids=[f"synthetic-{i}" for i in range(batch_size)],
        durations=(duration,) * batch_size,
        texts=[""] * batch_size,
    )
    return batch.to_padded(cfg.pad_id) if layout == "padded" else batch


class Calibrator:
    """Model + optimizer as in training; ``fits(d, L, B)`` runs one real step on a worst case.
    ``prompt_tokens``: the prompt length of the run's tokenizer (``tokenizer.prompt_length``)."""

    def __init__(
        self,
        model_cfg,
        optim_cfg,
        layout: str,
        device: torch.device,
        limit,
        precision: str,
        prompt_tokens: int,
    ) -> None:
        from speedasr.models.aed import AEDModel

        self.cfg, self.layout, self.device, self.limit = model_cfg, layout, device, limit
        self.prompt_tokens = prompt_tokens
        # Mixed precision as in training (Lightning's "bf16-mixed"/"16-mixed" are autocast).
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
        self.autocast = dtype if precision.endswith("mixed") else None
        self.model = AEDModel(model_cfg).to(device).train()
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-9,  # the weights barely move: every trial sees the same model
            betas=optim_cfg.betas,
            weight_decay=optim_cfg.weight_decay,
        )
        self.trials = 0
        # Adam state
        self._step(synthetic_batch(1.0, prompt_tokens + 1, 1, model_cfg, layout, prompt_tokens))

    def _step(self, batch) -> None:
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            out = self.model(batch.to(self.device))
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fits(self, duration: float, tokens: int, batch_size: int) -> tuple[bool, int]:
        self.trials += 1

        def step() -> None:
            self._step(
                synthetic_batch(
                    duration, tokens, batch_size, self.cfg, self.layout, self.prompt_tokens
                )
            )

        ok, peak = self.limit(step)
        log.info(
            "  d=%.2fs L=%d B=%d: %s (peak %.3f GiB)",
            duration, tokens, batch_size, "fits" if ok else "too big", peak / GIB,
        )  # fmt: skip
        return ok, peak


def largest_batch(
    fits: Callable[[int], tuple[bool, int]], lower: int, max_batch: int, gap: float
) -> tuple[int, int]:
    """Largest ``B`` in ``[lower, max_batch]`` with ``fits(B)``, to within ``gap`` (relative);
    ``lower`` is known to fit (0: nothing known). Returns ``(B, peak of B)``; B = 0 if even 1 fails.
    """
    lo, lo_peak = lower, 0
    if lo == 0:
        ok, peak = fits(1)
        if not ok:
            return 0, peak
        lo, lo_peak = 1, peak
    hi = None
    while hi is None and lo < max_batch:  # grow: double until a step does not fit
        b = min(2 * lo, max_batch)
        ok, peak = fits(b)
        if ok:
            lo, lo_peak = b, peak
        else:
            hi = b
    while hi is not None and hi - lo > max(1, gap * lo):  # bisect to the gap
        b = (lo + hi) // 2
        ok, peak = fits(b)
        if ok:
            lo, lo_peak = b, peak
        else:
            hi = b
    return lo, lo_peak


def calibrate_buckets(
    calibrator: Calibrator, shapes: list[tuple[float, int]], max_batch: int, gap: float
) -> list[BucketResult]:
    """Per-bucket batch sizes, largest bucket first (see the module docstring)."""
    results: dict[int, BucketResult] = {}
    for k in reversed(range(len(shapes))):
        d, n = shapes[k]
        lower = max(
            (r.batch_size for r in results.values() if d <= r.duration and n <= r.tokens),
            default=0,
        )
        before = calibrator.trials
        log.info("bucket %d (d <= %.2f s, L <= %d): search from %d", k, d, n, lower)
        b, peak = largest_batch(partial(calibrator.fits, d, n), lower, max_batch, gap)
        if b == 0:
            raise UserError(
                f"bucket {k} ({d:.1f} s, {n} tokens): even one utterance does not fit the memory "
                "limit; raise the budget or lower data.max_duration"
            )
        trials = calibrator.trials - before
        peak_gib = round(peak / GIB, 4) if peak else None
        results[k] = BucketResult(k, d, n, b, peak_gib, trials)
    return [results[k] for k in range(len(shapes))]


def packed_budget(results: list[BucketResult], cost) -> float:
    """Packed ``max_duration``: every bucket's worst-case batch within its calibrated size."""
    return min(r.batch_size * cost.audio(r.duration, r.tokens) for r in results)


# --- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config (YAML) to calibrate")
    parser.add_argument(
        "--init-from", default=None,
        help="fine-tuning: the checkpoint (or import-nemo directory) the run starts from, as "
        "train's init_from: its model and tokenizer are calibrated",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="config fragment to write (YAML)")
    parser.add_argument("--json", default=None, help="also write per-bucket measurements here")
    parser.add_argument(
        "--memory-budget", type=float, default=None,
        help="CPU: GiB the training process may use at its peak (required on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--reserve", type=float, default=0.0,
        help="GiB of the budget kept for what calibration does not run (data loading, logging)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-fraction", type=float, default=0.9,
        help="CUDA: fraction of device memory the allocator may use (default 0.9)",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if any)")
    parser.add_argument("--gap", type=float, default=0.05, help="bisection stops at this gap")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest batch tried")
    add_config_overrides(parser, train_config_sections, "--model.d_model=256 --data.train_cuts=X")


def train_config_sections() -> dict[str, type]:
    """``TrainConfig``'s sections (``data``, ``sampler``, ``model``, ...), as in ``--config``."""
    from speedasr.config import TrainConfig

    return dataclass_sections(TrainConfig)


def model_and_tokenizer(cfg):
    """The ``ModelConfig`` and tokenizer the run of ``cfg`` trains with, as ``speedasr train``
    makes them: with ``init_from``, the checkpoint's model settings (``parse_config`` has put the
    config's ``model.*`` keys on top; a change of shape is the same one-line error as in training)
    and its tokenizer, with the checkpoint's vocabulary (NeMo pads it past the tokenizer's);
    otherwise ``data.tokenizer`` and the config's model with that tokenizer's vocabulary."""
    from speedasr.data.tokenizer import Tokenizer

    if cfg.init_from:
        from speedasr.checkpoint import tokenizer_from_state
        from speedasr.train.pretrained import check_fits, read_pretrained

        if cfg.data.tokenizer:
            raise UserError(
                "data.tokenizer and init_from are both set: a run initialised from a checkpoint "
                "trains with the checkpoint's tokenizer (leave data.tokenizer empty)"
            )
        pretrained = read_pretrained(cfg.init_from)
        check_fits(pretrained, cfg.model)
        return cfg.model, tokenizer_from_state(pretrained.tokenizer_state)
    if not cfg.data.tokenizer:
        raise UserError("config key data.tokenizer is not set (nor init_from)")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    return cfg.model.with_vocabulary(tokenizer), tokenizer


def run(args: argparse.Namespace) -> int:
    from speedasr.data.bucketing import TokenCounter
    from speedasr.data.packing import PackingCost
    from speedasr.data.sampling import load_or_estimate_bins
    from speedasr.train.run import parse_config

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 < args.gap < 1:
        raise UserError(f"--gap must be in (0, 1), got {args.gap}")
    init_from = ["--init_from", args.init_from] if args.init_from else []
    cfg = parse_config(["--config", args.config, *init_from, *args.overrides.args])
    if cfg.sampler.mode not in ("bucket2d", "packed"):
        raise UserError(
            f"calibration needs sampler.mode bucket2d or packed, not {cfg.sampler.mode}"
        )
    model_cfg, tokenizer = model_and_tokenizer(cfg)
    counter = TokenCounter(tokenizer)
    if cfg.sampler.bins and Path(cfg.sampler.bins).is_file():
        bins = load_or_estimate_bins([], cfg.sampler, counter)
    elif cfg.data.train_cuts:
        from speedasr.data.manifests import load_cuts

        bins = load_or_estimate_bins(load_cuts(cfg.data.train_cuts), cfg.sampler, counter)
    else:
        raise UserError("set sampler.bins (a bins file) or data.train_cuts to estimate bins from")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        limit: MemoryLimit = CudaMemoryLimit(device, args.memory_fraction)
        limit_text = f"CUDA out-of-memory at memory fraction {args.memory_fraction}"
    else:
        if args.memory_budget is None or args.memory_budget <= args.reserve:
            raise UserError("on CPU give --memory-budget GiB (larger than --reserve)")
        limit = CpuMemoryLimit(int((args.memory_budget - args.reserve) * GIB))
        limit_text = f"process peak RSS <= {args.memory_budget} GiB - {args.reserve} GiB reserve"
    torch.manual_seed(0)
    start = time.time()
    calibrator = Calibrator(
        model_cfg, cfg.optim, cfg.data.layout, device, limit, str(cfg.trainer.precision),
        tokenizer.prompt_length,
    )  # fmt: skip
    results = calibrate_buckets(calibrator, bins.shapes(), args.max_batch, args.gap)
    seconds = time.time() - start

    sampler: dict = {"mode": cfg.sampler.mode}
    if cfg.sampler.mode == "bucket2d":
        sampler["batch_sizes"] = [r.batch_size for r in results]
    else:
        cost = PackingCost(
            max_duration=1.0,
            quadratic_duration=cfg.sampler.quadratic_duration,
            quadratic_cross=cfg.sampler.quadratic_cross,
        )
        sampler["max_duration"] = round(packed_budget(results, cost), 2)
    if cfg.sampler.bins:
        sampler["bins"] = cfg.sampler.bins
    else:
        log.warning("sampler.bins is not set: training must estimate the same bins again")
    params = sum(p.numel() for p in calibrator.model.parameters())
    source = f" (init_from {cfg.init_from})" if cfg.init_from else ""
    header = (
        f"# speedasr calibrate --config {args.config}: {len(results)} buckets, "
        f"{calibrator.trials} trials, {seconds:.0f} s, on {device}; limit: {limit_text}\n"
        f"# model: {params:,} parameters{source}\n"
        f"# use: speedasr train --config {args.config} --config {args.out}"
        + (f" --init_from {args.init_from}" if args.init_from else "")
        + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + _yaml({"sampler": sampler}))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"limit": limit_text, "device": str(device), "sampler": sampler,
                 "model": asdict(model_cfg), "parameters": params,
                 "prompt_tokens": tokenizer.prompt_length,
                 "buckets": [asdict(r) for r in results]},
                indent=1,
            )
        )  # fmt: skip
    print(f"{'bucket':>6} {'dur (s)':>8} {'tokens':>6} {'batch':>6} {'peak GiB':>9} {'trials':>6}")
    for r in results:
        print(
            f"{r.bucket:>6} {r.duration:>8.2f} {r.tokens:>6} {r.batch_size:>6} "
            f"{'-' if r.peak_gib is None else f'{r.peak_gib:.3f}':>9} {r.trials:>6}"
        )
    print(f"\n{header.strip()}")
    print(f"wrote {args.out}")
    return 0


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, default_flow_style=None, sort_keys=False)
