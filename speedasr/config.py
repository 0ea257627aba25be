"""Typed configuration of a training run. A run is data: a YAML file plus dotted overrides.

Every field has a docstring line; ``speedasr train --help`` prints them. Unknown keys and values of
the wrong type are errors that name the key. The ``trainer`` section is every argument of
``pytorch_lightning.Trainer``, typed from its signature: Lightning's callbacks, loggers, profilers
and strategies are given as ``{class_path: ..., init_args: {...}}``, as in Lightning's own CLI.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Union

from speedasr.data.sampling import SamplerConfig
from speedasr.models.aed import ModelConfig
from speedasr.train.datamodule import DataConfig
from speedasr.train.module import OptimConfig

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 10,  # Lightning: 1000 when max_steps is -1 too
    "precision": "32-true",  # Lightning: None, which means the same
    "gradient_clip_val": 1.0,  # Lightning: no clipping
    "log_every_n_steps": 10,  # Lightning: 50
    "num_sanity_val_steps": 0,  # Lightning: 2 (speedasr validates on the whole dev set)
    "enable_progress_bar": True,  # Lightning: None, which means the same
}
"""speedasr's defaults for the ``pytorch_lightning.Trainer`` arguments where they are not
Lightning's. Every other argument keeps Lightning's default."""

TRAINER_KEYS_SET_BY_SPEEDASR: dict[str, str] = {
    "default_root_dir": "it is out_dir",
    "use_distributed_sampler": "speedasr's samplers shard the data by rank themselves",
    "enable_checkpointing": "speedasr writes its checkpoints itself (see checkpoint.*)",
    "sync_batchnorm": "model.conv_norm=batch shares its statistics across ranks itself; "
    "Lightning's would swap in torch's SyncBatchNorm, which takes no layout",
}
"""``Trainer`` arguments that speedasr sets itself (not config keys), with the reason."""

_TRAINER_HELP: dict[str, str] = {
    "max_steps": "Stop after this many optimizer steps (-1: use max_epochs).",
    "max_epochs": "Stop after this many epochs (null: use max_steps).",
    "max_time": 'Wall-clock limit "DD:HH:MM:SS" (null: no limit).',
    "accelerator": "cpu, gpu, auto (or an Accelerator class_path).",
    "devices": "Devices per node: a count, a list of indices, or auto.",
    "num_nodes": "Nodes (multi-node via torchrun or SLURM).",
    "strategy": "auto, ddp, fsdp or any Lightning strategy name or class_path; see "
    "docs/distributed.md.",
    "precision": "32-true, bf16-mixed, 16-mixed, ...",
    "gradient_clip_val": "Clip the gradient norm to this value (null: no clipping).",
    "val_check_interval": "Validate every N training steps (int) or fraction of an epoch (float); "
    "null: every epoch.",
    "check_val_every_n_epoch": "Validate every N epochs (null when val_check_interval is a step "
    "count across epochs).",
    "num_sanity_val_steps": "Validation batches run before training (0: skip).",
    "logger": "null: speedasr's default, a CSVLogger in out_dir/logs (metrics.csv) and a "
    "TensorBoardLogger in out_dir/tensorboard when tensorboard is installed. A logger (or a list) "
    "as {class_path: ..., init_args: {...}}: those, besides the CSVLogger that `speedasr profile` "
    "reads. false: no logger.",
    "callbacks": "Extra callbacks, [{class_path: ..., init_args: {...}}, ...]; run besides "
    "speedasr's own (checkpoints, monitors, clean stop).",
    "profiler": "simple, advanced, pytorch, or a Profiler class_path.",
}
"""Descriptions of the ``trainer.*`` keys where speedasr's own says more than Lightning's."""


def _trainer_config_class() -> type:
    """A dataclass with one field per ``pytorch_lightning.Trainer`` argument (its type hint,
    Lightning's default or ``TRAINER_DEFAULTS``; ``TRAINER_KEYS_SET_BY_SPEEDASR`` left out), so
    the ``trainer`` section takes whatever the installed Lightning takes, typed and described
    as Lightning does (jsonargparse reads the generated docstring for ``--help``)."""
    import inspect
    import typing

    import pytorch_lightning as pl

    init = pl.Trainer.__init__
    hints = typing.get_type_hints(init)
    lightning_help = _parameter_help(init.__doc__ or "")
    fields, doc = [], []
    for name, param in inspect.signature(init).parameters.items():
        if name == "self" or name in TRAINER_KEYS_SET_BY_SPEEDASR:
            continue
        default = TRAINER_DEFAULTS.get(name, param.default)
        fields.append((name, _int_before_float(hints[name]), field(default=default)))
        text = _TRAINER_HELP.get(name) or lightning_help.get(name, "")
        doc.append(f"    {name}: {text or 'See Lightning.'}")
    cls = make_dataclass("TrainerConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = (
        "Arguments of ``pytorch_lightning.Trainer``: any of them, with Lightning's meaning "
        "(class_path + init_args for objects).\n\nArgs:\n" + "\n".join(doc)
    )
    return cls


def _parameter_help(docstring: str) -> dict[str, str]:
    """Argument name -> the first sentence of its description in a Google-style docstring,
    without Lightning's "Default: ..." (speedasr's defaults show beside it)."""
    import docstring_parser

    out = {}
    for param in docstring_parser.parse(docstring).params:
        text = " ".join((param.description or "").split())
        text = re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text.split("Default:")[0].strip())[0]
        out[param.arg_name] = re.sub(r":\w+:`", "`", text)  # Sphinx roles
    return out


def _int_before_float(hint: Any) -> Any:
    """``Union[float, int, ...]`` -> ``Union[int, float, ...]``: jsonargparse tries a union's
    types in order, so ``--trainer.limit_val_batches=3`` would become 3.0 (a fraction, which
    Lightning refuses above 1). Lightning writes ``Union[int, float]``, but the typing module's
    cache can hand back an equal union in another order."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not Union or int not in args or float not in args:
        return hint
    if args.index(int) < args.index(float):
        return hint
    return Union[tuple(sorted(args, key=lambda t: t is not int))]  # noqa: UP007 (ordered)


TrainerConfig = _trainer_config_class()
"""``trainer:`` of a run: every ``pytorch_lightning.Trainer`` argument (see above)."""


@dataclass
class MonitorsConfig:
    """Profiling callbacks (``speedasr.train.callbacks``) enabled during training."""

    padding: bool = True
    """PaddingMonitor: padding fraction of frames, tokens and attention per step."""
    gpu: bool = True
    """GPUUtilizationMonitor: NVML utilization and memory (does nothing without a GPU)."""
    throughput: bool = True
    """SpeechThroughputMonitor: real audio seconds, frames and tokens per second; MFU on GPUs."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written (``out_dir/checkpoints``; ``last.ckpt`` is always kept)."""

    every_n_steps: int | None = None
    """Also save every N optimizer steps, mid-epoch (``step{N}.ckpt``): what a crashed run resumes
    from. None: only at validation and at the end of each epoch."""
    keep: int = 2
    """Step checkpoints kept (the newest); -1 keeps all."""
    overwrite: bool = False
    """A run without ``resume`` may start in an out_dir whose checkpoints/ holds an earlier run's
    checkpoints: they are deleted first. False: that is an error (they would be overwritten)."""


@dataclass
class TrainConfig:
    """A whole training run."""

    out_dir: str = "exp/run"
    """Checkpoints, logs and reports go here."""
    seed: int = 0
    """Seed for weights, sampler and augmentation."""
    resume: str | None = None
    """Checkpoint to resume from, or "last" for out_dir/checkpoints/last.ckpt."""
    init_from: str | None = None
    """Fine-tune: start from this checkpoint's weights only (a speedasr checkpoint, or the
    directory speedasr import-nemo wrote): its model settings and tokenizer, with the model.* keys
    given here changed where the weights fit; new optimizer, schedule and step counter."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and batch layout."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Which cuts go together in a batch."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model dimensions and encoder/decoder split."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Arguments of pytorch_lightning.Trainer, any of them (objects as class_path + init_args)."""
    monitors: MonitorsConfig = field(default_factory=MonitorsConfig)
    """Profiling callbacks."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint schedule."""
    record_batches: bool = False
    """Append the cut ids of every training batch to ``out_dir/batches_rank{R}.jsonl`` (audit
    trail: which cuts each rank trained on, in order)."""


def train_parser():
    """The ``speedasr train`` parser (jsonargparse): ``--config FILE.yaml`` and one dotted flag per
    key of ``TrainConfig``; unknown keys and mistyped values are errors naming the key."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    _describe_fields_in_help()
    parser = ArgumentParser(
        prog="speedasr train",
        usage="speedasr train [--config FILE.yaml] [--KEY=VALUE ...] [--print_config] [-h]",
        description=(
            "Train a model. Every key below can be set in the YAML file given with --config and "
            "overridden with a dotted flag, e.g. --model.d_model=144 --trainer.max_steps=200. "
            "--print_config (or --print-config) prints the resolved config as YAML that --config "
            "accepts, and exits. Every run saves it as out_dir/config.yaml."
        ),
        exit_on_error=False,
        default_meta=False,
        formatter_class=_help_formatter(),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_class_arguments(TrainConfig, fail_untyped=True)
    return parser


def _help_formatter() -> type:
    """jsonargparse's help, compacter: a key, its choices if any, its description and default
    on one line where they fit (not ``--key KEY`` and a type beside every default)."""
    import argparse
    import shutil
    import sys

    from jsonargparse import DefaultHelpFormatter

    class CompactHelp(DefaultHelpFormatter):
        def __init__(self, prog: str, **kwargs: Any) -> None:
            columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 100
            super().__init__(prog, max_help_position=36, width=min(columns, 110) - 2, **kwargs)

        def _get_help_string(self, action) -> str:
            text = action.help or ""
            if text == "Path to a configuration file.":  # jsonargparse's, for a section
                return "A YAML file with keys of this section."
            if action.default in (argparse.SUPPRESS, None) and action.dest == "config":
                return text
            if action.default is argparse.SUPPRESS or action.nargs == 0 or not text:
                return text
            return f"{text} [%(default)s]"

        def _format_action_invocation(self, action) -> str:
            if not action.option_strings or action.nargs == 0:
                return super()._format_action_invocation(action)
            metavar = self._metavar_formatter(action, action.dest)(1)[0]
            choices = f" {metavar}" if str(metavar).startswith("{") else ""
            return action.option_strings[0] + choices

    return CompactHelp


def _describe_fields_in_help() -> None:
    """jsonargparse shows a field's attribute docstring (the string literal under it) only when
    told to parse them (off by default: it reads the source). Without it ``--help`` had types and
    defaults but no descriptions."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:  # jsonargparse < 4.35
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
