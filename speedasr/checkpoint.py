"""Load a trained model from a checkpoint, safely: ``torch.load(weights_only=True)`` only.

A speedasr checkpoint is a Lightning checkpoint whose hyperparameters are plain dicts and whose
tokenizer is embedded as bytes, so loading it never unpickles arbitrary objects (a checkpoint from
someone else cannot run code) and needs no other file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.models.aed import AEDModel, ModelConfig


@dataclass
class LoadedModel:
    model: AEDModel
    tokenizer: Tokenizer | AggregateTokenizer
    config: ModelConfig
    step: int


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict; ``UserError`` for a missing file or one that is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint '{path}' was refused: weights-only loading failed, so it is either not "
            f"a checkpoint or holds objects that could run code when loaded ({first})"
        ) from None
    except Exception as e:  # torch.load raises many types on garbage (IndexError, KeyError, ...)
        raise UserError(
            f"'{path}' is not a readable checkpoint ({type(e).__name__}: {e})"
        ) from None


# Settings added after checkpoints were already being saved, with the value an older checkpoint
# (one without the key) was trained with, where that is not the field's default.
_LEGACY_MODEL_SETTINGS = {
    # Before `block_out_norm` existed every encoder block ended with a LayerNorm.
    "block_out_norm": True,
}


def saved_model_config(model_hparams: dict, path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint's model was trained with, from its saved
    ``hyper_parameters["model"]`` dict.

    A setting the checkpoint lacks (saved before the setting existed) takes the value its model
    was built with: ``_LEGACY_MODEL_SETTINGS`` where that differs from today's default, else
    the field's default (new options default to the old behaviour, e.g. the absolute positions).
    ``UserError`` naming ``path`` for settings this version does not know.
    """
    unknown = sorted(set(model_hparams) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise UserError(
            f"checkpoint '{path}' has model settings this version of speedasr does not know: "
            f"{', '.join(unknown)} (saved by another version?)"
        )
    return ModelConfig(**{**_LEGACY_MODEL_SETTINGS, **model_hparams})


def tokenizer_from_state(state: dict) -> Tokenizer | AggregateTokenizer:
    """A checkpoint's tokenizer: speedasr's own, or NeMo's aggregate (``import-nemo``)."""
    if state.get("kind") == "nemo_aggregate":
        return AggregateTokenizer.from_state(state)
    return Tokenizer.from_state(state)


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attention_backend: str | None = None,
) -> LoadedModel:
    """The model of a speedasr checkpoint, in eval mode, its weights cast to ``dtype`` on
    ``device`` (inference in bfloat16: see ``speedasr.inference.inference_dtype``), running
    ``attention_backend`` (None: the checkpoint's ``model.attention_backend``)."""
    ckpt = read_checkpoint(path)
    try:
        config = saved_model_config(ckpt["hyper_parameters"]["model"], path)
        tokenizer = tokenizer_from_state(ckpt["tokenizer"])
        state = {
            k.removeprefix("model."): v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("model.")
        }
    except (KeyError, TypeError) as e:
        raise UserError(f"'{path}' is not a speedasr checkpoint (missing {e})") from None
    if attention_backend is not None:  # how the model runs, not what it is (same weights)
        try:
            config = replace(config, attention_backend=attention_backend)
        except ValueError as e:  # e.g. a kernel without relative positions
            raise UserError(f"attention backend '{attention_backend}' for '{path}': {e}") from None
    model = AEDModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint '{path}' does not match its model config: "
            f"missing {missing[:3]}..., unexpected {unexpected[:3]}..."
        )
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, config, int(ckpt.get("global_step", 0)))
