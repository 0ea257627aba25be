"""Fine-tuning: ``init_from: PATH`` starts a run from pretrained weights only.

``PATH`` is a speedasr checkpoint (a training checkpoint, ``speedasr export``'s input, or
``import-nemo``'s ``model.ckpt``) or the directory ``import-nemo`` wrote. The run takes the
checkpoint's weights, its tokenizer and its model settings; everything else is new: the optimizer,
the learning-rate schedule, the step counter and the data position (unlike ``resume``, which
continues a run exactly). ``model.*`` keys given in the run's config (YAML or dotted flags) change
the checkpoint's settings where the weights still fit them (dropout, label smoothing, frozen
BatchNorm statistics, ...); a change that alters a tensor's shape or the set of tensors is a
one-line error naming the tensors and the changed settings.

A checkpoint of an imported NeMo model also carries NeMo's original config and tokenizer files;
the run's checkpoints carry them on, so ``speedasr export-nemo`` writes the fine-tuned model back
as a ``.nemo``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from speedasr.errors import UserError
from speedasr.models.aed import ModelConfig

IMPORTED_CHECKPOINT = "model.ckpt"
"""The file of an ``import-nemo`` output directory (``speedasr.nemo.import_nemo``)."""


@dataclass
class Pretrained:
    """What a run initialised from a checkpoint takes from it."""

    path: Path
    """The checkpoint file read."""
    model: ModelConfig
    """The settings its weights were trained with."""
    tokenizer_state: dict
    """Its embedded tokenizer (speedasr's or NeMo's aggregate)."""
    state_dict: dict[str, torch.Tensor]
    """The model's tensors (without Lightning's ``model.`` prefix)."""
    nemo: dict | None
    """NeMo's original config and tokenizer files (imported models), else None."""


def checkpoint_file(init_from: str | Path) -> Path:
    """``init_from`` as a checkpoint file: a directory means its ``model.ckpt`` (import-nemo)."""
    path = Path(init_from)
    if path.is_dir():
        path = path / IMPORTED_CHECKPOINT
        if not path.is_file():
            raise UserError(
                f"init_from '{init_from}' is a directory without {IMPORTED_CHECKPOINT} (give a "
                "checkpoint file or the directory speedasr import-nemo wrote)"
            )
    elif not path.is_file():
        raise UserError(f"init_from '{init_from}' does not exist")
    return path


def read_pretrained(init_from: str | Path) -> Pretrained:
    """The checkpoint named by ``init_from``, loaded with ``weights_only=True`` (memory-mapped)."""
    from speedasr.checkpoint import read_checkpoint, saved_model_config

    path = checkpoint_file(init_from)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; read_checkpoint names the rest
        ckpt = read_checkpoint(path)
    try:
        config = saved_model_config(ckpt["hyper_parameters"]["model"], path)
        tokenizer = ckpt["tokenizer"]
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"init_from '{path}' is not a speedasr checkpoint (missing {e})") from None
    nemo = ckpt.get("nemo") if isinstance(ckpt.get("nemo"), dict) else None
    return Pretrained(path, config, tokenizer, state, nemo)


def merged_model_settings(saved: ModelConfig, given: dict) -> dict:
    """The run's model settings: the checkpoint's, with the ``model.*`` keys the config gave."""
    return {**asdict(saved), **{k: v for k, v in given.items() if k in asdict(saved)}}


def given_model_keys(parser, argv: list[str]) -> dict:
    """The ``model.*`` keys set by the config file(s) or dotted flags of ``argv`` (not defaults)."""
    given = parser.parse_args(argv, defaults=False)
    section = getattr(given, "model", None)
    if section is None:
        return {}
    names = {f.name for f in fields(ModelConfig)}
    return {k: v for k, v in vars(section).items() if k in names}


def check_fits(pretrained: Pretrained, config: ModelConfig) -> None:
    """``UserError`` naming the tensors of the model ``config`` builds that the checkpoint's do
    not fit (missing, extra, another shape), and the settings that differ from the checkpoint's.
    Built on the meta device: no memory, milliseconds, so a run fails before reading its data."""
    from speedasr.models.aed import AEDModel

    with torch.device("meta"):
        ours = {k: v.shape for k, v in AEDModel(config).state_dict().items()}
    theirs = pretrained.state_dict
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [
        f"{k} {tuple(theirs[k].shape)} -> {tuple(ours[k])}"
        for k in sorted(set(ours) & set(theirs))
        if theirs[k].shape != ours[k]
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"shapes differ: {_few(shapes)}")
    if missing:
        parts.append(f"not in the checkpoint: {_few(missing)}")
    if unexpected:
        parts.append(f"not in this model: {_few(unexpected)}")
    saved, now = asdict(pretrained.model), asdict(config)
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in saved if saved[k] != now.get(k)]
    why = f" (model settings changed: {', '.join(changed)})" if changed else ""
    raise UserError(
        f"init_from '{pretrained.path}' does not fit this model: {'; '.join(parts)}{why}"
    )


def load_pretrained_weights(model: torch.nn.Module, pretrained: Pretrained, config) -> None:
    """Copy ``pretrained``'s tensors into ``model`` (built from ``config``; ``check_fits``)."""
    check_fits(pretrained, config)
    model.load_state_dict(pretrained.state_dict, strict=True)


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def frontend_for(config: ModelConfig, pretrained: Pretrained | None) -> torch.nn.Module | None:
    """The feature module the data pipeline runs for this model: NeMo's front end (with the
    checkpoint's window and filterbank, when initialised from one) or None for lhotse's fbank."""
    if config.frontend != "nemo":
        return None
    from speedasr.nn.filterbank import NemoFilterbank

    frontend = NemoFilterbank(config.n_mels)
    saved = {
        k.removeprefix("frontend."): v
        for k, v in (pretrained.state_dict if pretrained is not None else {}).items()
        if k.startswith("frontend.")
    }
    ours = frontend.state_dict()
    if saved.keys() == ours.keys() and all(v.shape == ours[k].shape for k, v in saved.items()):
        # NeMo's own tables (a shape mismatch is reported by load_pretrained_weights)
        frontend.load_state_dict({k: v.float().clone() for k, v in saved.items()})
    return frontend
