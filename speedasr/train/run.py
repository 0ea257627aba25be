"""`speedasr train --config FILE.yaml [--dotted.key=value ...]`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from speedasr.errors import UserError


def parse_config(argv: list[str]):
    """YAML + dotted overrides -> ``TrainConfig`` (jsonargparse; unknown keys are errors)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse import ArgumentError as JsonArgError

    from speedasr.config import TrainConfig

    parser = ArgumentParser(prog="speedasr train", exit_on_error=False, default_meta=False)
    parser.description = (
        "Train a model. Every key below can be set in the YAML file given with --config and "
        "overridden with a dotted flag, e.g. --model.d_model=144 --trainer.max_steps=200. "
        "--print-config prints the resolved config and exits."
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_class_arguments(TrainConfig, fail_untyped=True)
    for i, a in enumerate(argv):  # a clearer message than jsonargparse's for the common case
        path = (
            a.split("=", 1)[1]
            if a.startswith("--config=")
            else (argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        )
        if path is not None and not Path(path).is_file():
            raise UserError(f"config file '{path}' does not exist")
    try:
        ns = parser.parse_args(argv)
        return parser.instantiate(ns)
    except JsonArgError as e:
        raise UserError(" ".join(str(e).split())) from None


def main(argv: list[str]) -> int:
    if "--print-config" in argv:
        import dataclasses
        import json

        cfg = parse_config([a for a in argv if a != "--print-config"])
        plain = {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in vars(cfg).items()
        }
        print(json.dumps(plain, indent=2, default=str))
        return 0
    return train(parse_config(argv))


def train(cfg) -> int:
    """Run training from a resolved ``TrainConfig``; returns a process exit code."""
    import pytorch_lightning as pl
    import torch

    from speedasr.train.builder import (
        build_callbacks,
        build_logger,
        check_fresh_start,
        resolve_resume,
    )
    from speedasr.train.module import AsrModule
    from speedasr.train.progress import limit_heap_arenas

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not cfg.data.train_cuts:
        raise UserError("config key data.train_cuts is not set")
    if not cfg.data.tokenizer:
        raise UserError("config key data.tokenizer is not set")
    check_trainer_config(cfg.trainer)
    out_dir = Path(cfg.out_dir)
    check_fresh_start(out_dir, cfg.resume, cfg.checkpoint.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    limit_heap_arenas()  # host memory stays flat across epochs (docs/benchmarks.md)

    datamodule, model_cfg = build_data_and_model_config(cfg, out_dir)
    ckpt = resolve_resume(cfg.resume, out_dir)
    if ckpt is not None:
        check_resume_checkpoint(ckpt, model_cfg, datamodule.tokenizer)
    module = AsrModule.build(model_cfg, cfg.optim, datamodule.tokenizer)
    callbacks, monitors = build_callbacks(cfg, out_dir)
    trainer = pl.Trainer(
        default_root_dir=str(out_dir),
        logger=build_logger(out_dir),
        callbacks=callbacks,
        use_distributed_sampler=False,  # lhotse samplers shard by rank themselves
        **vars(cfg.trainer),
    )
    completed = False
    try:
        code = _fit_and_report(trainer, module, datamodule, ckpt, callbacks, monitors, out_dir)
        completed = True
        return code
    finally:
        _leave_process_group(wait_for_others=completed)


def _fit_and_report(trainer, module, datamodule, ckpt, callbacks, monitors, out_dir) -> int:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from speedasr.train.faults import FaultMonitor, GracefulStop

    start = time.time()
    # weights_only: a checkpoint from someone else cannot run code (speedasr's hold plain values).
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except SIGTERMException:  # SIGTERM or Ctrl-C: GracefulStop saved a checkpoint if it says so
        stop = next(c for c in callbacks if isinstance(c, GracefulStop))
        if trainer.global_rank == 0:
            print(stop.message(trainer.global_step), file=sys.stderr)
        return stop.exit_code
    # Lightning's save_last copies last.ckpt only when a top-k checkpoint is written, so after a
    # validation that did not improve it would hold older weights: write the final state here.
    trainer.save_checkpoint(str(out_dir / "checkpoints" / "last.ckpt"), weights_only=False)
    faults = next(m for m in monitors if isinstance(m, FaultMonitor))
    skipped = _gather_skipped(trainer, faults.skipped_cuts)
    skipped_report = None
    if trainer.global_rank == 0:
        print(f"\ntraining done in {time.time() - start:.0f} s, {trainer.global_step} steps")
        for name, report in datamodule.reports.items():
            print(f"{name} data: {report.summary()}")
        if skipped:
            path = out_dir / "skipped_train.jsonl"
            skipped_report = datamodule.explain_skipped(skipped)
            skipped_report.write(path)
            print(f"cuts skipped mid-training (audio failed to load): {len(skipped)}, see {path}")
        for m in monitors:
            if hasattr(m, "summary"):
                print(m.summary())
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        print(f"checkpoints: {out_dir / 'checkpoints'} (best: {best or 'n/a'})")
    check_something_trained(trainer.global_step, faults, skipped_report)
    return 0


def _leave_process_group(wait_for_others: bool) -> None:
    """Destroy the data-parallel process group, after the ranks wait for each other when all of
    them got to the end (not after an error, which another rank may never reach), so no rank
    exits while another's communication threads still use its sockets (a gloo rank aborted once
    in a full test run with "terminate called without an active exception" after training)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()


def check_something_trained(steps: int, faults, skipped_report=None) -> None:
    """``UserError`` (exit code 2) with the counts by reason when no step of the run updated the
    model: every step was skipped (all its cuts failed to load, or non-finite loss/gradients), or
    there was no step at all."""
    skipped_steps = sum(faults.skipped_steps.values())
    if steps > skipped_steps:
        return
    steps_text = ", ".join(f"{k} {v}" for k, v in sorted(faults.skipped_steps.items()))
    text = f"no training step updated the model: {skipped_steps} of {steps} steps skipped"
    text += f" ({steps_text})" if steps_text else ""
    if skipped_report is not None and skipped_report.rejects:
        from speedasr.data.manifests import format_reason_counts

        text += f"; cuts that failed to load: {format_reason_counts(skipped_report.rejects)}"
    raise UserError(text)


def build_data_and_model_config(cfg, report_dir: Path | None = None):
    """The run's ``AsrDataModule`` and the ``ModelConfig`` it feeds, made to agree here: the data
    extracts the model's ``n_mels`` log-mel bins, and the model's vocabulary is the tokenizer's."""
    from speedasr.data.datamodule import AsrDataModule

    datamodule = AsrDataModule(
        cfg.data, cfg.sampler, n_mels=cfg.model.n_mels, seed=cfg.seed,
        report_dir=str(report_dir) if report_dir is not None else None,
    )  # fmt: skip
    model_cfg = cfg.model
    if model_cfg.vocab_size != datamodule.tokenizer.vocab_size:
        model_cfg = type(model_cfg)(
            **{**model_cfg.__dict__, "vocab_size": datamodule.tokenizer.vocab_size,
               "pad_id": datamodule.tokenizer.pad_id}
        )  # fmt: skip
    return datamodule, model_cfg


def check_trainer_config(trainer) -> None:
    """Errors Lightning would raise late (after data validation) or obscurely, raised early."""
    import torch

    from speedasr.train.builder import check_trainer_settings

    strategy = str(trainer.strategy)
    if strategy.startswith("fsdp"):
        cpu = trainer.accelerator == "cpu" or (
            trainer.accelerator == "auto" and not torch.cuda.is_available()
        )
        if cpu:
            raise UserError(
                f"trainer.strategy={strategy} needs GPUs (Lightning's FSDP is CUDA only); "
                "use trainer.strategy=ddp on CPU"
            )
    if trainer.max_steps == -1 and trainer.max_epochs is None and trainer.max_time is None:
        raise UserError("set trainer.max_steps, trainer.max_epochs or trainer.max_time")
    check_trainer_settings(trainer)  # the rest, by Lightning


def check_resume_checkpoint(path: str, model_cfg, tokenizer) -> None:
    """Refuse, with the differences named, a checkpoint that does not fit this run's model or
    tokenizer (Lightning's own error is a wall of tensor size mismatches), or that holds objects
    that would run code when unpickled."""
    from dataclasses import asdict

    from speedasr.checkpoint import read_checkpoint, saved_model_config

    ckpt = read_checkpoint(path)  # weights_only: refuses pickled payloads with a UserError
    saved = (ckpt.get("hyper_parameters") or {}).get("model")
    if not isinstance(saved, dict) or "state_dict" not in ckpt:
        raise UserError(f"'{path}' is not a speedasr training checkpoint")
    # Settings the checkpoint predates compare as the value its model was built with.
    saved, now = asdict(saved_model_config(saved, path)), asdict(model_cfg)
    diff = [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
        for k in sorted(set(now) | set(saved))
        if k not in _RESUMABLE_MODEL_CHANGES and saved.get(k) != now.get(k)
    ]
    if ckpt.get("tokenizer") is not None and ckpt["tokenizer"] != tokenizer.to_state():
        diff.append("data.tokenizer: a different tokenizer than the checkpoint's")
    if diff:
        raise UserError(f"checkpoint '{path}' does not match this config: " + "; ".join(diff))


# Model settings that do not change the parameters' shapes or meaning.
_RESUMABLE_MODEL_CHANGES = frozenset({"attention_backend", "dropout"})


def _gather_skipped(trainer, ids: list[str]) -> list[str]:
    """Skipped cut ids of every rank (on each rank), in a stable order."""
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, list(ids))
        ids = [i for part in parts for i in part]
    return list(dict.fromkeys(ids))
