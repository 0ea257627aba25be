"""`speedasr bench convergence`: time to accuracy of packed vs padded batching, the headline number.

The same model, from the same initial weights (a checksum of the state dict is recorded when each
run starts training), trains on the same cuts with the same learning-rate schedule in optimizer
steps, once per batching strategy, at the same memory budget ``S`` (``--budget-seconds``):

  - ``random``: lhotse's shuffled ``DynamicCutSampler``, padded layout, ``B × longest ≤ S``;
  - ``bucket2d``: speedasr's 2D (duration × tokens) buckets, padded layout, ``B × longest ≤ S``
    (as many buckets as the corpus fills, ``speedasr.bench.padding.auto_buckets``);
  - ``packed``: speedasr's packed sampler (the config's 2D buckets, topped up across buckets),
    packed layout, ``Σ duration ≤ S``.

So every batch holds at most ``S`` seconds of feature frames *as the model computes them*: padded
frames count in the padded layouts, none exist in the packed one. TPS-outlier rejection is off in
the 2D modes (``strict: false``) so that every strategy trains on the same cuts.

Every ``--val-every`` steps the dev set is decoded greedily with the attention decoder and the CTC
head; each point records optimizer steps, training wall seconds (validation excluded: the clock
stops while validating; the elapsed time including validation is recorded too) and hours of real
audio seen. Per strategy: the training time, steps and audio to the first validation at or below
``--target-wer``, and the ratio of packed's time to padded-random's and padded-2D's. Runs are
sequential (a training run is minutes long); with ``--repeats`` the strategies alternate
(random, bucket2d, packed, random, ...) and every repeat uses a new seed (new initial weights,
shared by that repeat's strategies); ratios are the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from speedasr.bench.convergence_report import (
    LABELS,
    markdown_table,
    plot_curves,
    summarize,
    time_to_target,
)
from speedasr.errors import UserError
from speedasr.options import add_config_overrides
from speedasr.train.calibrate import train_config_sections

STRATEGIES = ("random", "bucket2d", "packed")
METRICS = {"attention": "wer", "ctc": "ctc_wer"}
"""``--target-metric`` -> the validation metric (``AsrModule``: val/wer, val/ctc_wer)."""
DEFAULT_TARGET_WER = 0.75


def state_checksum(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's state dict: names, dtypes, shapes, values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class RunResult:
    """One strategy's training run: its validation curve and what its batches held."""

    strategy: str
    repeat: int
    seed: int
    initial_checksum: str = ""
    points: list[dict[str, float]] = field(default_factory=list)
    """Per validation: step, train_seconds, elapsed_seconds, audio_hours, wer, ctc_wer."""
    steps: int = 0
    train_seconds: float = 0.0
    """Wall seconds of training (data loading included), validation excluded."""
    elapsed_seconds: float = 0.0
    """Wall seconds from the first step to the end, validation included."""
    audio_hours: float = 0.0
    utterances: int = 0
    padding: dict[str, float] = field(default_factory=dict)
    """Padding fractions of the training batches (``PaddingStats.fractions``)."""
    max_batch_seconds: float = 0.0
    """Largest batch cost in seconds as the model computes it: ``B × longest`` (padded) or
    ``Σ duration`` (packed); never above the budget."""
    mean_real_seconds_per_batch: float = 0.0
    time_to_target: dict[str, float] | None = None
    """train_seconds, elapsed_seconds, step, audio_hours of the first point at the target."""


class ConvergenceRecorder(pl.Callback):
    """Records a run's ``RunResult``: the training clock (stopped during validation), audio and
    utterances seen, padding of every batch, and val/wer, val/ctc_wer at every validation."""

    def __init__(self, result: RunResult, packed: bool, max_steps: int, progress=print) -> None:
        self.result, self.packed, self.max_steps, self.progress = (
            result,
            packed,
            max_steps,
            progress,
        )
        self._stats = None
        self._start = self._val_start = 0.0
        self._val_seconds = 0.0
        self._audio = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        from speedasr.data.padding import PaddingStats

        self.result.initial_checksum = state_checksum(pl_module.model)
        self._stats = PaddingStats()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        from speedasr.data.padding import batch_padding

        if batch.batch_size == 0:
            return
        self._audio += batch.audio_seconds
        self.result.utterances += batch.batch_size
        self._stats += batch_padding(
            batch.feature_segments.lengths, batch.token_segments.lengths, packed=self.packed
        )
        cost = (
            batch.audio_seconds if self.packed else batch.batch_size * max(batch.durations)
        )  # the budget's own measure, see the module docstring
        self.result.max_batch_seconds = max(self.result.max_batch_seconds, cost)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        train_seconds = self._val_start - self._start - self._val_seconds
        self._val_seconds += now - self._val_start
        metrics = trainer.callback_metrics
        point = {
            "step": trainer.global_step,
            "train_seconds": round(train_seconds, 3),
            "elapsed_seconds": round(self._val_start - self._start, 3),
            "audio_hours": self._audio / 3600,
            "wer": float(metrics["val/wer"]) if "val/wer" in metrics else float("nan"),
            "ctc_wer": float(metrics["val/ctc_wer"]) if "val/ctc_wer" in metrics else float("nan"),
        }
        self.result.points.append(point)
        self.progress(
            f"  {self.result.strategy:8s} step {point['step']:5d}/{self.max_steps}: "
            f"train {train_seconds:6.0f} s, {point['audio_hours']:5.2f} h audio, dev WER "
            f"attention {100 * point['wer']:5.1f}%, CTC {100 * point['ctc_wer']:5.1f}% "
            f"(validation {now - self._val_start:.0f} s)"
        )

    def on_train_end(self, trainer, pl_module) -> None:
        r = self.result
        r.steps = trainer.global_step
        r.elapsed_seconds = time.perf_counter() - self._start
        r.train_seconds = r.elapsed_seconds - self._val_seconds
        r.audio_hours = self._audio / 3600
        r.padding = self._stats.fractions()
        r.mean_real_seconds_per_batch = self._audio / max(1, r.steps)


def strategy_config(base, strategy: str, budget: float, train_seconds: float):
    """The ``TrainConfig`` of one strategy: ``base`` with its sampler mode, budget and layout."""
    from speedasr.bench.padding import auto_buckets

    # Options that only packed mode accepts are dropped for the padded modes.
    sampler = replace(base.sampler, max_duration=budget, quadratic_cross=None, bins=None)
    sampler = replace(sampler, quadratic_tokens=None, batch_sizes=None, strict=False)
    if strategy == "packed":
        sampler = replace(base.sampler, mode="packed", max_duration=budget, strict=False)
    elif strategy == "bucket2d":
        n_d, n_k = auto_buckets(train_seconds, budget)
        sampler = replace(sampler, mode="bucket2d", num_buckets=n_d, num_token_buckets=n_k)
    else:
        sampler = replace(sampler, mode="random", max_tokens=None)
    layout = "packed" if strategy == "packed" else "padded"
    return with_fields(base, sampler=sampler, data=replace(base.data, layout=layout))


def with_fields(cfg, **changes):
    """A copy of a run config with some top-level fields replaced (``parse_config`` gives a
    namespace of dataclasses, not a dataclass)."""
    if dataclasses.is_dataclass(cfg):
        return replace(cfg, **changes)
    out = copy.copy(cfg)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def train_strategy(cfg, strategy: str, shared, initial: dict, result: RunResult, progress) -> None:
    """Train ``cfg`` (one strategy's config) from the ``initial`` weights, recording into
    ``result``. ``shared`` is a set-up ``AsrDataModule`` whose validated cuts are reused."""
    from speedasr.train.datamodule import AsrDataModule
    from speedasr.train.faults import FaultMonitor  # skips non-finite steps, as in training
    from speedasr.train.module import AsrModule
    from speedasr.train.resume import TrainingProgress

    pl.seed_everything(result.seed, workers=True, verbose=False)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "GPU available", tips: 3x per run
    datamodule = AsrDataModule(cfg.data, cfg.sampler, n_mels=cfg.model.n_mels, seed=result.seed)
    datamodule.train_cuts, datamodule.dev_cuts = shared.train_cuts, shared.dev_cuts
    module = AsrModule.build(shared_model_config(cfg, shared), cfg.optim, datamodule.tokenizer)
    module.model.load_state_dict(initial)
    t = cfg.trainer
    recorder = ConvergenceRecorder(result, strategy == "packed", t.max_steps, progress)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrainingProgress(result.seed), FaultMonitor(), recorder],
        use_distributed_sampler=False, devices=1, accelerator=t.accelerator,
        precision=t.precision, gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches, max_steps=t.max_steps,
        max_epochs=None, val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning vs torch 2.13
        trainer.fit(module, datamodule=datamodule)


def shared_model_config(cfg, datamodule):
    """The config's model with the tokenizer's vocabulary (as ``speedasr train`` builds it)."""
    tok = datamodule.tokenizer
    return replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)


def run_benchmark(
    base, strategies, budget: float, repeats: int, metric: str, target: float, progress=print
) -> list[RunResult]:
    """Every strategy's run, ``repeats`` times, alternating strategies within each repeat."""
    from speedasr.models.aed import AEDModel
    from speedasr.train.datamodule import AsrDataModule

    shared = AsrDataModule(base.data, base.sampler, n_mels=base.model.n_mels, seed=base.seed)
    shared.setup("fit")
    if shared.dev_cuts is None:
        raise UserError("bench convergence needs dev cuts (--dev-cuts or data.dev_cuts)")
    train_seconds = sum(c.duration for c in shared.train_cuts)
    progress(
        f"data: {len(shared.train_cuts)} train cuts ({train_seconds / 3600:.2f} h), "
        f"{len(shared.dev_cuts)} dev cuts"
    )
    results = []
    for r in range(repeats):
        seed = base.seed + r
        torch.manual_seed(seed)
        initial = AEDModel(shared_model_config(base, shared)).state_dict()
        for strategy in strategies:
            cfg = strategy_config(base, strategy, budget, train_seconds)
            progress(f"{strategy}: repeat {r + 1}/{repeats}, seed {seed}, {LABELS[strategy]}")
            result = RunResult(strategy, r, seed)
            train_strategy(cfg, strategy, shared, initial, result, progress)
            result.time_to_target = time_to_target(result.points, metric, target)
            progress(
                f"{strategy}: {result.steps} steps, {result.train_seconds:.0f} s training "
                f"({result.elapsed_seconds:.0f} s with validation), {result.audio_hours:.2f} h "
                f"audio, padding {100 * result.padding['padding_frames']:.1f}% of frames; to "
                f"{metric} WER <= {100 * target:.0f}%: "
                + (
                    f"{result.time_to_target['train_seconds']:.0f} s"
                    if result.time_to_target
                    else "not reached"
                )
            )
            results.append(result)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="recipes/tiny/convergence.yaml",
        help="training config YAML: model, optimizer, schedule, validation (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--data", default="data/tiny",
        help="corpus directory of `speedasr data synth` with tokenizer-bpe512/ (default: "
        "%(default)s); --train-cuts, --dev-cuts, --tokenizer override its parts",
    )  # fmt: skip
    parser.add_argument("--train-cuts", help="training cutset (default: DATA/train_cuts.jsonl.gz)")
    parser.add_argument("--dev-cuts", help="dev cutset (default: DATA/dev_cuts.jsonl.gz)")
    parser.add_argument("--tokenizer", help="tokenizer dir (default: DATA/tokenizer-bpe512)")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES),
        help="comma-separated, run in this order in each repeat (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-seconds", type=float,
        help="memory budget per batch in seconds of frames as computed (padded: B x longest; "
        "packed: sum of durations); default: the config's sampler.max_duration",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=int, help="optimizer steps per run (default: config)")
    parser.add_argument(
        "--val-every", type=int, help="validate every N steps (default: config's "
        "trainer.val_check_interval); --max-steps must be a multiple of it",
    )  # fmt: skip
    parser.add_argument("--val-utterances", type=int, help="first N dev cuts (default: config)")
    parser.add_argument(
        "--target-metric", default="ctc", choices=sorted(METRICS),
        help="WER the target applies to: greedy CTC head or attention decoder (default: "
        "%(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--target-wer", type=float, default=DEFAULT_TARGET_WER,
        help="target dev WER as a fraction (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs per strategy (new seed each)")
    parser.add_argument("--seed", type=int, help="first repeat's seed (default: config's seed)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--out", default="exp/bench-convergence",
        help="writes convergence.json, convergence.md, convergence.png here (default: "
        "%(default)s)",
    )  # fmt: skip
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    add_config_overrides(parser, train_config_sections, "--model.absolute_memory_positions=true")


def resolve_config(args: argparse.Namespace):
    """The base ``TrainConfig``: ``--config`` + data paths + ``--SECTION.KEY=VALUE`` overrides +
    the bench's flags."""
    from speedasr.train.run import parse_config

    if not Path(args.config).is_file():
        raise UserError(f"--config '{args.config}' does not exist")
    data = Path(args.data)
    paths = {
        "train_cuts": args.train_cuts or str(data / "train_cuts.jsonl.gz"),
        "dev_cuts": args.dev_cuts or str(data / "dev_cuts.jsonl.gz"),
        "tokenizer": args.tokenizer or str(data / "tokenizer-bpe512"),
    }
    for key, path in paths.items():
        if not Path(path).exists():
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{flag} '{path}' does not exist (make it with recipes/tiny/run.sh, or pass "
                f"{flag} / --data)"
            )
    argv = ["--config", args.config, *(f"--data.{k}={v}" for k, v in paths.items())]
    cfg = parse_config(argv + args.overrides.args)
    t = cfg.trainer
    steps = args.max_steps if args.max_steps is not None else t.max_steps
    every = args.val_every if args.val_every is not None else t.val_check_interval
    budget = args.budget_seconds if args.budget_seconds is not None else cfg.sampler.max_duration
    if steps is None or steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {steps}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise UserError(f"--val-every must be a step count >= 1, got {every}")
    if steps % every:
        raise UserError(f"--max-steps {steps} must be a multiple of --val-every {every}")
    if not budget > 0:
        raise UserError(f"--budget-seconds must be > 0, got {budget}")
    if args.val_utterances is not None and args.val_utterances < 1:
        raise UserError(f"--val-utterances must be >= 1, got {args.val_utterances}")
    data_cfg = replace(
        cfg.data,
        # Every strategy must see the same cuts: none may be longer than a padded batch.
        max_duration=min(cfg.data.max_duration, budget),
        val_max_utterances=args.val_utterances or cfg.data.val_max_utterances,
    )
    from speedasr.data.tokenizer import Tokenizer

    tok = Tokenizer.load(paths["tokenizer"])  # the model's vocabulary, as `speedasr train` sets it
    return with_fields(
        cfg,
        seed=cfg.seed if args.seed is None else args.seed,
        model=replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id),
        data=data_cfg,
        sampler=replace(cfg.sampler, max_duration=budget),
        trainer=replace(t, max_steps=steps, val_check_interval=every),
    )


def parse_strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if not names or unknown or len(set(names)) != len(names):
        raise UserError(
            f"--strategies must be distinct names from {', '.join(STRATEGIES)}, got '{text}'"
        )
    return names


def run(args: argparse.Namespace) -> int:
    strategies = parse_strategies(args.strategies)
    if not 0 < args.target_wer < 1:
        raise UserError(f"--target-wer must be a fraction in (0, 1), got {args.target_wer}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401  (fail before the runs, not after them)
        except ImportError:
            raise UserError(
                "plotting needs matplotlib: pip install 'speedasr[plots]' (or pass --no-plot)"
            ) from None
    cfg = resolve_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = METRICS[args.target_metric]
    machine = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    print(
        f"bench convergence: {', '.join(strategies)} x {args.repeats}, budget "
        f"{cfg.sampler.max_duration} s, {cfg.trainer.max_steps} steps, validation every "
        f"{cfg.trainer.val_check_interval} steps, target {args.target_metric} WER <= "
        f"{100 * args.target_wer:.0f}%, {machine['torch_threads']} threads on "
        f"{machine['cpus_usable']} CPUs"
    )
    start = time.time()
    results = run_benchmark(
        cfg, strategies, cfg.sampler.max_duration, args.repeats, metric, args.target_wer
    )
    machine["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary = summarize(results, strategies)
    table = markdown_table(summary, args.target_metric, args.target_wer)
    report = {
        "summary": summary,
        "runs": [asdict(r) for r in results],
        "settings": {
            "strategies": strategies, "target_metric": args.target_metric,
            "target_wer": args.target_wer, "repeats": args.repeats,
            "budget_seconds": cfg.sampler.max_duration, "wall_seconds": time.time() - start,
            "config": _plain(cfg),
        },
        "machine": machine,
    }  # fmt: skip
    (out / "convergence.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "convergence.md").write_text(table)
    written = [out / "convergence.json", out / "convergence.md"]
    if not args.no_plot:
        plot_curves(results, args.target_metric, args.target_wer, out / "convergence.png")
        written.append(out / "convergence.png")
    print("\n" + table)
    print(f"done in {time.time() - start:.0f} s; wrote {', '.join(map(str, written))}")
    return 0


def _plain(cfg) -> dict[str, Any]:
    return {k: asdict(v) if dataclasses.is_dataclass(v) else v for k, v in vars(cfg).items()}
