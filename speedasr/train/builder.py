"""Assembles the Lightning pieces of a run from its config: logger, callbacks, resume path."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger

from speedasr.errors import UserError


def build_logger(out_dir: Path) -> list[Logger]:
    """CSV always (``out_dir/logs/version_N/metrics.csv``); TensorBoard too when installed."""
    loggers: list[Logger] = [CSVLogger(str(out_dir), name="logs")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tensorboard"))
    except ImportError:
        pass
    return loggers


def build_callbacks(cfg, out_dir: Path) -> tuple[list[pl.Callback], list[pl.Callback]]:
    """Checkpointing, exact-resume progress, fault tolerance, a clean stop on SIGTERM/Ctrl-C and
    the enabled profiling monitors. Returns (all callbacks, monitors); ``FaultMonitor`` counts as
    a monitor (it has a summary)."""
    from speedasr.console import LOG_REFRESH_STEPS, is_terminal
    from speedasr.train.callbacks import (
        GPUUtilizationMonitor,
        PaddingMonitor,
        SpeechThroughputMonitor,
    )
    from speedasr.train.faults import FaultMonitor, GracefulStop
    from speedasr.train.progress import LogProgressBar, TrainingProgress

    has_val = bool(cfg.data.dev_cuts)
    checkpoint = ModelCheckpoint(
        dirpath=str(out_dir / "checkpoints"),
        filename="step{step}-wer{val/wer:.3f}" if has_val else "step{step}",
        auto_insert_metric_name=False,
        monitor="val/wer" if has_val else None,
        mode="min",
        save_top_k=1 if has_val else 0,
        save_last=True,
        # A resumed run that writes a name again writes the same state (resume is exact), and
        # last.ckpt is always the newest state (GracefulStop writes it too): overwrite, rather
        # than Lightning's last-v1.ckpt, step8-v1.ckpt, ... A run that does not resume starts
        # in an empty checkpoints/ (check_fresh_start).
        enable_version_counter=False,
    )
    checkpoints = [checkpoint]
    every = cfg.checkpoint.every_n_steps
    if every is not None:
        if every < 1:
            raise UserError(f"checkpoint.every_n_steps must be >= 1 or null, got {every}")
        checkpoints.append(
            ModelCheckpoint(  # mid-epoch checkpoints to resume a crashed run from
                dirpath=str(out_dir / "checkpoints"),
                filename="step{step}",
                auto_insert_metric_name=False,
                every_n_train_steps=every,
                monitor="step",
                mode="max",
                save_top_k=cfg.checkpoint.keep,
                save_last=False,  # one writer of last.ckpt; `resume: last` takes the newest file
                # Save at the step itself. Otherwise, with a monitor, Lightning defers a save at
                # an epoch's last batch to the end of a validation it expects next, which with
                # val_check_interval in steps may come much later or at a step already saved.
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
        )
    progress = TrainingProgress(cfg.seed, record_dir=out_dir if cfg.record_batches else None)
    monitors: list[pl.Callback] = [FaultMonitor()]
    if cfg.monitors.padding:
        monitors.append(PaddingMonitor())
    if cfg.monitors.gpu:
        monitors.append(GPUUtilizationMonitor())
    if cfg.monitors.throughput:
        monitors.append(SpeechThroughputMonitor())
    stop = GracefulStop(out_dir / "checkpoints" / "last.ckpt")
    callbacks = [
        progress, *checkpoints, stop, LearningRateMonitor(logging_interval="step"), *monitors,
    ]  # fmt: skip
    if cfg.trainer.enable_progress_bar and not is_terminal():
        # Into a log file every redraw is appended: a plain line every 100 steps instead.
        callbacks.append(LogProgressBar(every_n_steps=LOG_REFRESH_STEPS))
    return callbacks, monitors


def resolve_resume(resume: str | None, out_dir: Path) -> str | None:
    """``"last"``: the newest checkpoint in ``out_dir/checkpoints`` (``last.ckpt`` or a newer
    mid-epoch ``step{N}.ckpt``); otherwise the path itself."""
    if resume is None:
        return None
    path = Path(resume)
    if resume == "last":
        found = sorted(
            (out_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name)
        )
        path = found[-1] if found else out_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"resume checkpoint '{path}' does not exist")
    return str(path)


def check_fresh_start(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A run that does not resume must not write into an ``out_dir/checkpoints`` that holds an
    earlier run's checkpoints: they would be overwritten name by name (no version counter, see
    ``build_callbacks``) and mixed with this run's, and ``resume: last`` could pick an old one.
    A ``UserError`` naming the directory and the ways out, or with ``overwrite`` they are
    deleted first."""
    if resume is not None:
        return
    directory = out_dir / "checkpoints"
    found = sorted(directory.glob("*.ckpt"))
    if not found:
        return
    if not overwrite:
        raise UserError(
            f"'{directory}' holds {len(found)} checkpoint(s) of an earlier run and this run does "
            "not resume: continue that run with --resume last, or train into another --out_dir "
            "(or delete them), or set checkpoint.overwrite=true to delete them and start anew"
        )
    for path in found:
        path.unlink(missing_ok=True)  # every rank runs this (DDP); none has written yet


def check_trainer_settings(trainer_cfg) -> None:
    """Let Lightning validate the ``trainer.*`` settings now, before data validation: builds a
    throwaway ``pl.Trainer`` (milliseconds) and turns its error into a ``UserError`` naming the
    key, found by trying each changed setting alone on top of the defaults."""
    error = _trainer_error(vars(trainer_cfg))
    if error is None:
        return
    defaults = vars(type(trainer_cfg)())
    changed = {k: v for k, v in vars(trainer_cfg).items() if v != defaults.get(k)}
    culprits = [k for k in changed if _trainer_error({**defaults, k: changed[k]}) is not None]
    keys = culprits[:1] or list(changed)  # no key fails alone: the combination is at fault
    named = ", ".join(f"trainer.{k}={changed[k]!r}" for k in keys) or "trainer settings"
    raise UserError(f"{named}: {error}")


def _trainer_error(settings: dict) -> str | None:
    """Lightning's complaint about these Trainer settings (its first line), or None."""
    import logging
    import warnings

    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    lightning_log = logging.getLogger("pytorch_lightning")
    level = lightning_log.level
    lightning_log.setLevel(logging.ERROR)  # "GPU available: ..." is for the real Trainer
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(
                logger=False, enable_checkpointing=False, enable_model_summary=False, **settings
            )
    except (MisconfigurationException, ValueError, TypeError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    finally:
        lightning_log.setLevel(level)
    return None
