"""`speedasr train --config FILE.yaml [--dotted.key=value ...]`."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import time
from pathlib import Path

from speedasr.errors import UserError

PRINT_CONFIG_FLAGS = ("--print_config", "--print-config")
"""Print the resolved config as YAML and exit: jsonargparse's (and LightningCLI's) spelling, and
speedasr's dashed one (which printed JSON before; both print the same YAML now)."""
CONFIG_FILE = "config.yaml"
"""The resolved config of a run, in ``out_dir``: ``speedasr train --config out_dir/config.yaml``
runs it again."""


def load_config(argv: list[str]):
    """YAML + dotted overrides -> (parser, parsed namespace): plain values, class_path specs not
    yet built, so ``parser.dump`` writes it back as YAML. ``UserError`` naming the key for an
    unknown key or a value of the wrong type."""
    from jsonargparse import ArgumentError as JsonArgError

    from speedasr.config import train_parser

    for i, a in enumerate(argv):  # a clearer message than jsonargparse's for the common case
        path = (
            a.split("=", 1)[1]
            if a.startswith("--config=")
            else (argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        )
        if path is not None and not Path(path).is_file():
            raise UserError(f"config file '{path}' does not exist")
    parser = train_parser()
    try:
        ns = parser.parse_args(argv)
    except JsonArgError as e:
        keys = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
        raise UserError(config_error(str(e), keys)) from None
    if ns.init_from:
        _model_from_checkpoint(parser, ns, argv)
    return parser, ns


def _model_from_checkpoint(parser, ns, argv: list[str]) -> None:
    """``init_from``: the ``model`` section becomes the checkpoint's settings, with the keys the
    config gave on top (so the saved config.yaml states the model the run trains)."""
    from speedasr.train.pretrained import (
        given_model_keys,
        merged_model_settings,
        read_pretrained,
    )

    saved = read_pretrained(ns.init_from).model
    for key, value in merged_model_settings(saved, given_model_keys(parser, argv)).items():
        setattr(ns.model, key, value)


def instantiate_config(parser, ns):
    """The parsed namespace with its sections as config dataclasses and the ``trainer``'s
    class_path specs (callbacks, loggers, profiler, ...) built. A logger whose package is
    missing is a ``UserError`` naming the package."""
    from jsonargparse import ArgumentError as JsonArgError

    try:
        return parser.instantiate(ns)
    except (JsonArgError, ValueError, TypeError, ImportError) as e:
        raise UserError(config_error(str(e))) from None


def parse_config(argv: list[str]):
    """YAML + dotted overrides -> the run's config (sections as dataclasses, ``trainer`` with its
    callbacks and loggers built); unknown keys and mistyped values are errors naming the key."""
    return instantiate_config(*load_config(argv))


def dump_config(parser, ns) -> str:
    """The parsed config as YAML that ``--config`` reads back to the same config (nulls kept:
    a null that overrides a non-null default must survive the round trip)."""
    return parser.dump(ns, skip_none=False)


def config_error(message: str, keys: list[str] = ()) -> str:
    """jsonargparse's multi-line error -> one line: the key, the value given and the most
    specific reason (a missing package, a bad class_path, the types expected); for an unknown
    key, the closest of ``keys`` or why speedasr sets it itself."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "invalid config"
    unknown = _unknown_key(lines[0])
    if unknown is not None:
        return _unknown_key_error(unknown, keys)
    key = re.search(r'[Kk]ey "([^"]+)"', lines[0])
    given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), "")
    if len(given) > 40 or given.startswith(("Namespace(", "[Namespace(", "{", "[{")):
        given = ""  # a class_path spec: the reason names its class
    where = f"{key.group(1)}={given}" if key and given else (key.group(1) if key else "")
    requirement = re.search(r"Requirement '([^']+)' not met", message)
    class_path = re.search(r"Problem with given class_path '([^']+)':", message)
    if requirement:
        package = re.split(r"[<>=!~ \[]", requirement.group(1))[0]
        what = class_path.group(1) if class_path else "this config"
        reason = (
            f"{what} needs the package '{package}', which is not installed "
            f"(pip install '{requirement.group(1)}')"
        )
        where = where or ("trainer.logger" if "Logger" in what else "")
    elif "lightning.pytorch." in message:
        reason = (
            "speedasr uses the pytorch_lightning package: write class paths as "
            "pytorch_lightning.loggers.CSVLogger (or just CSVLogger), not lightning.pytorch...."
        )
    elif not key:
        reason = " ".join(lines)  # not about one key: jsonargparse's whole message
    elif class_path:
        after = lines[lines.index(next(ln for ln in lines if "Problem with given" in ln)) + 1]
        reason = f"{class_path.group(1)}: {after.lstrip('- ')}"
    else:
        expected = [ln[len("- Expected a ") :] for ln in lines if ln.startswith("- Expected a ")]
        specific = [
            ln.lstrip("- ")
            for ln in lines[1:]
            if not ln.startswith(("- Expected a", "Given value", "Subtypes:", "Errors:"))
            and not ln.startswith("Does not validate")
        ]
        if specific:
            reason = _type_name(specific[0])
        elif expected:
            reason = "expected " + " or ".join(_type_name(t) for t in expected)
        else:
            reason = re.sub(r'^Parser key "[^"]+":\s*', "", " ".join(lines))
    return f"{where}: {reason}" if where else reason


def _unknown_key(first_line: str) -> str | None:
    """The dotted key of jsonargparse's "unrecognized arguments: --a.b=1" (a flag) or "Group
    'a' does not accept option 'b'" (a YAML key), or None."""
    flag = re.match(r"[Uu]nrecognized arguments: --([\w.]+)", first_line)
    if flag:
        return flag.group(1)
    group = re.match(r"Group '([\w.]+)' does not accept option '(\w+)'", first_line)
    return f"{group.group(1)}.{group.group(2)}" if group else None


def _unknown_key_error(key: str, keys: list[str]) -> str:
    from speedasr.config import TRAINER_KEYS_SET_BY_SPEEDASR

    section, _, name = key.rpartition(".")
    if section == "trainer" and name in TRAINER_KEYS_SET_BY_SPEEDASR:
        return f"{key} is not a config key: speedasr sets it ({TRAINER_KEYS_SET_BY_SPEEDASR[name]})"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"unknown config key {key}" + (f" (did you mean {close[0]}?)" if close else "")


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text.replace("NoneType", "null")


def _print_config_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without the print-config flags, and whether one was given."""
    rest = [a for a in argv if a not in PRINT_CONFIG_FLAGS]
    return rest, len(rest) != len(argv)


def main(argv: list[str]) -> int:
    argv, print_only = _print_config_requested(argv)
    parser, ns = load_config(argv)
    if print_only:
        print(dump_config(parser, ns), end="")
        return 0
    return train(instantiate_config(parser, ns), config_yaml=dump_config(parser, ns))


def train(cfg, config_yaml: str | None = None) -> int:
    """Run training from a resolved config (``parse_config``); returns a process exit code.
    ``config_yaml`` (``dump_config``'s text) is saved as ``out_dir/config.yaml``."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from speedasr.train.builder import (
        build_callbacks,
        build_loggers,
        check_fresh_start,
        describe_outputs,
        log_run_config,
        resolve_resume,
    )
    from speedasr.train.host_memory import limit_heap_arenas
    from speedasr.train.module import AsrModule
    from speedasr.train.pretrained import check_fits, load_pretrained_weights, read_pretrained

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not cfg.data.train_cuts:
        raise UserError("config key data.train_cuts is not set")
    if cfg.init_from and cfg.data.tokenizer:
        raise UserError(
            "data.tokenizer and init_from are both set: a run initialised from a checkpoint "
            "trains with the checkpoint's tokenizer (leave data.tokenizer empty)"
        )
    if not cfg.data.tokenizer and not cfg.init_from:
        raise UserError("config key data.tokenizer is not set")
    check_trainer_config(cfg.trainer)
    check_attention_backend_runs(cfg.model.attention_backend, cfg.trainer.accelerator)
    out_dir = Path(cfg.out_dir)
    check_fresh_start(out_dir, cfg.resume, cfg.checkpoint.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE if config_yaml is not None else None
    if config_path is not None and rank_zero_only.rank == 0:
        config_path.write_text(config_yaml)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    limit_heap_arenas()  # host memory stays flat across epochs (docs/benchmarks.md)

    pretrained = read_pretrained(cfg.init_from) if cfg.init_from else None
    if pretrained is not None:
        check_fits(pretrained, cfg.model)  # before the data is read and validated
    datamodule, model_cfg = build_data_and_model_config(cfg, out_dir, pretrained)
    ckpt = resolve_resume(cfg.resume, out_dir)
    if ckpt is not None:
        check_resume_checkpoint(ckpt, model_cfg, datamodule.tokenizer)
    module = AsrModule.build(model_cfg, cfg.optim, datamodule.tokenizer)
    if pretrained is not None:
        # Weights only: the optimizer, schedule, step counter and data position start anew (a
        # resumed run then replaces the weights with its checkpoint's).
        load_pretrained_weights(module.model, pretrained, model_cfg)
        module.nemo_files = pretrained.nemo
        del pretrained  # the module holds its own copy of the weights
    callbacks, monitors = build_callbacks(cfg, out_dir, model_cfg)
    settings = {k: v for k, v in vars(cfg.trainer).items() if k not in ("logger", "callbacks")}
    loggers = build_loggers(out_dir, cfg.trainer.logger)
    try:
        trainer = pl.Trainer(
            default_root_dir=str(out_dir),
            logger=loggers,
            callbacks=callbacks,
            use_distributed_sampler=False,  # lhotse samplers shard by rank themselves
            **settings,
        )
    except (MisconfigurationException, ValueError, TypeError) as e:  # e.g. two progress bars
        raise UserError(f"trainer settings: {' '.join(str(e).split())}") from None
    if rank_zero_only.rank == 0:  # (the trainer's rank is set only when fit starts)
        writes = describe_outputs(out_dir, trainer.loggers, config_path, chosen=cfg.trainer.logger)
        print(f"this run writes:\n{writes}")
    if config_yaml is not None and cfg.trainer.enable_autolog_hparams:
        log_run_config(trainer.loggers, config_yaml, skip=module.hparams)
    completed = False
    try:
        code = _fit_and_report(
            trainer, module, datamodule, ckpt, callbacks, monitors, out_dir, config_path,
            cfg.trainer.logger,
        )  # fmt: skip
        completed = True
        return code
    finally:
        _leave_process_group(wait_for_others=completed)


def _fit_and_report(
    trainer, module, datamodule, ckpt, callbacks, monitors, out_dir, config_path, chosen_logger
) -> int:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from speedasr.train.builder import describe_outputs
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
        wrote = describe_outputs(out_dir, trainer.loggers, config_path, trainer, chosen_logger)
        print(f"this run wrote:\n{wrote}")
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


def build_data_and_model_config(cfg, report_dir: Path | None = None, pretrained=None):
    """The run's ``AsrDataModule`` and the ``ModelConfig`` it feeds, made to agree here: the data
    extracts the model's features (``n_mels`` log-mel bins of its front end: lhotse's fbank, or
    NeMo's with the checkpoint's tables) and the model's vocabulary is the tokenizer's (with
    ``init_from``: the checkpoint's tokenizer). ``pretrained``: ``cfg.init_from`` already read."""
    from speedasr.checkpoint import tokenizer_from_state
    from speedasr.train.datamodule import AsrDataModule
    from speedasr.train.pretrained import frontend_for, read_pretrained

    if pretrained is None and cfg.init_from:
        pretrained = read_pretrained(cfg.init_from)
    tokenizer = tokenizer_from_state(pretrained.tokenizer_state) if pretrained else None
    datamodule = AsrDataModule(
        cfg.data, cfg.sampler, n_mels=cfg.model.n_mels, seed=cfg.seed,
        report_dir=str(report_dir) if report_dir is not None else None,
        tokenizer=tokenizer, frontend=frontend_for(cfg.model, pretrained),
    )  # fmt: skip
    model_cfg = cfg.model
    if pretrained is not None:
        # The checkpoint's vocabulary: NeMo pads it to a multiple of 8 past the tokenizer's.
        return datamodule, model_cfg
    return datamodule, model_cfg.with_vocabulary(datamodule.tokenizer)


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


def check_attention_backend_runs(backend: str, accelerator) -> None:
    """``model.attention_backend`` triton or flash_attn without its package, or on a run that
    does not train on CUDA, is a ``UserError`` now, before any data is read (the backend itself
    would fail at the first training step)."""
    import torch
    from pytorch_lightning.accelerators import Accelerator, CUDAAccelerator

    from speedasr.nn.attention import check_attention_backend

    if isinstance(accelerator, Accelerator):
        device = "cuda" if isinstance(accelerator, CUDAAccelerator) else type(accelerator).__name__
    elif str(accelerator) in ("auto", "gpu"):  # what Lightning picks for these
        mps = torch.backends.mps.is_available()
        device = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    else:
        device = str(accelerator)
    check_attention_backend(
        backend, device == "cuda", setting=f"model.attention_backend={backend}",
        device=f"this run trains on {device} (trainer.accelerator={accelerator})",
        instead="model.attention_backend=auto or torch",
    )  # fmt: skip


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
