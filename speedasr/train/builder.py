"""Assembles the Lightning pieces of a run from its config: loggers, callbacks, resume path, and
where the run writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger

from speedasr.errors import UserError


def build_loggers(out_dir: Path, chosen=None) -> list[Logger]:
    """The run's loggers from ``trainer.logger`` (built by the config parser):

    * ``None`` or ``True``: speedasr's default, a ``CSVLogger`` (``out_dir/logs/version_N/
      metrics.csv``) and a ``TensorBoardLogger`` (``out_dir/tensorboard``) when ``tensorboard``
      is installed;
    * a logger or a list of them: those, and the ``CSVLogger`` above unless one is among them
      (``speedasr profile`` reads its ``metrics.csv``);
    * ``False``: none.
    """
    if chosen is False:
        return []
    csv = CSVLogger(str(out_dir), name="logs")
    if chosen is None or chosen is True:
        return [csv, *([TensorBoardLogger(str(out_dir), name="tensorboard")] if _has_tb() else [])]
    chosen = [chosen] if isinstance(chosen, Logger) else list(chosen)
    return chosen if any(isinstance(lg, CSVLogger) for lg in chosen) else [csv, *chosen]


def _has_tb() -> bool:
    """Whether TensorBoard can be written (Lightning's TensorBoardLogger needs one of these)."""
    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def describe_outputs(
    out_dir: Path,
    loggers: list[Logger],
    config: Path | None,
    trainer: pl.Trainer | None = None,
    chosen=None,
) -> str:
    """Where a run writes its checkpoints, logs and config, one indented line each (``trainer``:
    after training, to name the best checkpoint). ``chosen``: ``trainer.logger`` as configured;
    only speedasr's default (None or True) would log to TensorBoard, so only then does a missing
    ``tensorboard`` get a line."""
    checkpoints = str(out_dir / "checkpoints")
    if trainer is not None and trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path
        checkpoints += f" (last.ckpt, best: {Path(best).name})" if best else " (last.ckpt)"
    rows = [("checkpoints", checkpoints)]
    for lg in loggers:
        rows.append(_logger_row(lg))
    if not loggers:
        rows.append(("logs", "none (trainer.logger: false)"))
    elif (chosen is None or chosen is True) and not _has_tb():
        rows.append(("tensorboard", "not installed (pip install tensorboard to log there too)"))
    if config is not None:
        rows.append(("config", f"{config} (speedasr train --config reads it)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {where}" for name, where in rows)


def _logger_row(lg: Logger) -> tuple[str, str]:
    """(what, where) for one logger. Only local loggers' ``log_dir`` is read: other loggers'
    may start a remote run when asked for theirs."""
    if isinstance(lg, CSVLogger):
        return "metrics.csv", str(Path(lg.log_dir) / "metrics.csv")
    if isinstance(lg, TensorBoardLogger):
        return "tensorboard", f"{lg.log_dir} (tensorboard --logdir {lg.root_dir})"
    where = getattr(lg, "save_dir", None)
    return type(lg).__name__, str(where) if where else "(not a local directory)"


def log_run_config(loggers: list[Logger], config_yaml: str, skip) -> None:
    """Log the run's config as hyperparameters (W&B's config, MLflow's params, TensorBoard's
    hparams, the CSV logger's ``hparams.yaml``), except the sections in ``skip``: the
    LightningModule logs those itself (``model`` with the tokenizer's vocabulary size, ``optim``),
    and MLflow refuses a parameter logged twice with different values."""
    config = yaml.safe_load(config_yaml)
    params = {k: v for k, v in config.items() if k not in skip}
    for lg in loggers:
        lg.log_hyperparams(params)


def build_callbacks(
    cfg, out_dir: Path, model_cfg=None
) -> tuple[list[pl.Callback], list[pl.Callback]]:
    """Checkpointing, exact-resume progress, fault tolerance, a clean stop on SIGTERM/Ctrl-C and
    the enabled profiling monitors, then the user's ``trainer.callbacks``. Returns (all
    callbacks, monitors); ``FaultMonitor`` counts as a monitor (it has a summary)."""
    from speedasr.console import LOG_REFRESH_STEPS, is_terminal
    from speedasr.train.callbacks import (
        GPUUtilizationMonitor,
        PaddingMonitor,
        SpeechThroughputMonitor,
    )
    from speedasr.train.faults import FaultMonitor, GracefulStop
    from speedasr.train.progress import LogProgressBar
    from speedasr.train.resume import TrainingProgress

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
        # the encoder frames the model really computes (its subsampling factor)
        monitors.append(PaddingMonitor(encoder_length=(model_cfg or cfg.model).encoder_length))
    if cfg.monitors.gpu:
        monitors.append(GPUUtilizationMonitor())
    if cfg.monitors.throughput:
        monitors.append(SpeechThroughputMonitor())
    stop = GracefulStop(out_dir / "checkpoints" / "last.ckpt")
    # Lightning refuses a LearningRateMonitor in a run without loggers (trainer.logger: false).
    lr = [LearningRateMonitor(logging_interval="step")] if cfg.trainer.logger is not False else []
    callbacks = [progress, *checkpoints, stop, *lr, *monitors]
    user = cfg.trainer.callbacks or []
    user = [user] if isinstance(user, pl.Callback) else list(user)
    has_bar = any(isinstance(c, ProgressBar) for c in user)  # Lightning allows one
    if cfg.trainer.enable_progress_bar and not is_terminal() and not has_bar:
        # Into a log file every redraw is appended: a plain line every 100 steps instead.
        callbacks.append(LogProgressBar(every_n_steps=LOG_REFRESH_STEPS))
    return callbacks + user, monitors


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
    key, found by trying each changed setting alone on top of the defaults. (Loggers and
    callbacks are built and type-checked by the config parser; the real Trainer takes them.)"""
    from speedasr.config import TrainerConfig

    settings = {k: v for k, v in vars(trainer_cfg).items() if k not in ("logger", "callbacks")}
    error = _trainer_error(settings)
    if error is None:
        return
    defaults = vars(TrainerConfig())
    changed = {k: v for k, v in settings.items() if v != defaults.get(k)}
    culprits = [k for k in changed if _trainer_error({**defaults, **{k: changed[k]}}) is not None]
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
            settings = {k: v for k, v in settings.items() if k != "callbacks"}
            quiet = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False}
            pl.Trainer(**{**settings, **quiet})
    except (MisconfigurationException, ValueError, TypeError) as e:
        return " ".join(str(e).split()) or type(e).__name__
    finally:
        lightning_log.setLevel(level)
    return None
