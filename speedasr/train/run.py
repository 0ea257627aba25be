"""`speedasr train --config FILE.yaml [--dotted.key=value ...]`."""

from __future__ import annotations

import logging
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
        print(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        return 0
    return train(parse_config(argv))


def train(cfg) -> int:
    """Run training from a resolved ``TrainConfig``; returns a process exit code."""
    import pytorch_lightning as pl
    import torch

    from speedasr.train.builder import build_callbacks, build_logger, resolve_resume
    from speedasr.data.datamodule import AsrDataModule
    from speedasr.train.module import AsrModule

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not cfg.data.train_cuts:
        raise UserError("config key data.train_cuts is not set")
    if not cfg.data.tokenizer:
        raise UserError("config key data.tokenizer is not set")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    datamodule = AsrDataModule(cfg.data, cfg.sampler, seed=cfg.seed, report_dir=str(out_dir))
    model_cfg = cfg.model
    if model_cfg.vocab_size != datamodule.tokenizer.vocab_size:
        model_cfg = type(model_cfg)(
            **{**model_cfg.__dict__, "vocab_size": datamodule.tokenizer.vocab_size,
               "pad_id": datamodule.tokenizer.pad_id}
        )  # fmt: skip
    module = AsrModule.build(model_cfg, cfg.optim, datamodule.tokenizer)
    callbacks, monitors = build_callbacks(cfg, out_dir)
    trainer = pl.Trainer(
        default_root_dir=str(out_dir),
        logger=build_logger(out_dir),
        callbacks=callbacks,
        use_distributed_sampler=False,  # lhotse samplers shard by rank themselves
        **vars(cfg.trainer),
    )
    ckpt = resolve_resume(cfg.resume, out_dir)
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.global_rank == 0:
        print(f"\ntraining done in {time.time() - start:.0f} s, {trainer.global_step} steps")
        for name, report in datamodule.reports.items():
            print(f"{name} data: {report.summary()}")
        for m in monitors:
            if hasattr(m, "summary"):
                print(m.summary())
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        print(f"checkpoints: {out_dir / 'checkpoints'} (best: {best or 'n/a'})")
    return 0
