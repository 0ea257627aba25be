"""``speedasr export-nemo CKPT --out MODEL.nemo``: an imported Canary checkpoint back to ``.nemo``.

The inverse of ``import_nemo``: every speedasr tensor goes back to its NeMo key(s) (fused
projections split into q/k/v, ``Linear`` weights of NeMo's 1×1 ``Conv1d`` get their kernel axis
back), the tied head is stored under both of NeMo's names (one storage, as NeMo saves it) and the
decoder's position table is rebuilt exactly as NeMo builds it (sinusoids ÷ √width, float32). The
archive is what NeMo's ``save_to`` writes (docs/canary.md §1): an uncompressed tar with
``./model_config.yaml`` (the original config, byte for byte), ``./model_weights.ckpt`` and the
original tokenizer files under their original names, which the config's ``nemo:`` paths name.

So import → export → import is bit-identical, and so is NeMo's state dict after import → export.
The checkpoint must come from ``import-nemo`` (it carries the original config and files).
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import time
from pathlib import Path

import torch
import yaml

from speedasr.errors import UserError
from speedasr.models.aed import AEDModel
from speedasr.nemo.archive import CONFIG_MEMBER, WEIGHTS_MEMBER
from speedasr.nemo.import_nemo import key_map
from speedasr.nn.positions import sinusoidal_positions

CONV_1X1 = ("conv.pointwise_conv1.weight", "conv.pointwise_conv2.weight")
"""NeMo keys of 1×1 Conv1d weights ``(out, in, 1)``; speedasr holds them as Linear ``(out, in)``."""


def nemo_state_dict(model: AEDModel, config: dict) -> dict[str, torch.Tensor]:
    """``model``'s tensors under NeMo's names and shapes (float32, CPU)."""
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, sources in key_map(model.cfg).items():
        parts = ours[key].chunk(len(sources)) if len(sources) > 1 else (ours[key],)
        for name, part in zip(sources, parts, strict=True):
            if name.endswith(CONV_1X1):
                part = part.unsqueeze(-1)
            out[name] = part.clone()
    embedding = out["transf_decoder._embedding.token_embedding.weight"]
    out["log_softmax.mlp.layer0.weight"] = embedding  # tied: one storage, both names (as NeMo)
    dec = config["transf_decoder"]["config_dict"]
    rows, width = int(dec["max_sequence_length"]), int(dec["hidden_size"])
    table = sinusoidal_positions(torch.arange(rows), width)
    out["transf_decoder._embedding.position_embedding.pos_enc"] = table.div_(math.sqrt(width))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(f"./{name}")
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def export_nemo(ckpt_path: str | Path, out_path: str | Path) -> Path:
    """Write ``out_path`` (a ``.nemo``) from an ``import-nemo`` checkpoint."""
    from speedasr.nemo.import_nemo import load_imported

    model, ckpt = load_imported(ckpt_path)
    nemo = ckpt.get("nemo")
    if not isinstance(nemo, dict) or "config" not in nemo or "files" not in nemo:
        raise UserError(
            f"checkpoint '{ckpt_path}' was not made by speedasr import-nemo (it holds no NeMo "
            "config and tokenizer files to write back)"
        )
    config = yaml.safe_load(nemo["config"])
    state = nemo_state_dict(model, config)
    weights = io.BytesIO()
    torch.save(state, weights)
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give the .nemo file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(nemo["files"].items()):
            _add(tar, name, data, now)
        _add(tar, CONFIG_MEMBER, nemo["config"], now)
        _add(tar, WEIGHTS_MEMBER, weights.getvalue(), now)
    tmp.replace(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="a checkpoint written by speedasr import-nemo (model.ckpt)")
    parser.add_argument("--out", required=True, help="the .nemo file to write")


def run(args: argparse.Namespace) -> int:
    out = export_nemo(args.ckpt, args.out)
    print(f"exported {args.ckpt} to {out} (NeMo EncDecMultiTaskModel.restore_from reads it)")
    return 0
