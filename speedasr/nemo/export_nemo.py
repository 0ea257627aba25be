"""``speedasr export-nemo CKPT --out MODEL.nemo``: an imported Canary checkpoint back to ``.nemo``.

The inverse of ``import_nemo``: every speedasr tensor goes back to its NeMo key(s) (fused
projections split into q/k/v, ``Linear`` weights of NeMo's 1×1 ``Conv1d`` get their kernel axis
back), the tied head is stored under both of NeMo's names (one storage, as NeMo saves it) and the
decoder's position table is rebuilt exactly as NeMo builds it (sinusoids ÷ √width, float32). The
archive is what NeMo's ``save_to`` writes (docs/canary.md §1): an uncompressed tar with
``./model_config.yaml`` (the original config, byte for byte), ``./model_weights.ckpt`` and the
original tokenizer files under their original names, which the config's ``nemo:`` paths name.
An existing ``--out`` file is replaced only with ``--overwrite`` (as import-nemo's ``--out``).

So import → export → import is bit-identical, and so is NeMo's state dict after import → export.
The checkpoint must come from ``import-nemo`` or from a run fine-tuning one (``init_from``): both
carry the original config and files. Model settings that differ from what the original config
says (a fine-tuning run's dropout, say) are written into the config under the key
``import_nemo.model_config`` reads them from (``NEMO_CONFIG_KEYS``); with none changed the config
is written back byte for byte.
"""

from __future__ import annotations

import argparse
import io
import math
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from speedasr.errors import UserError
from speedasr.models.aed import AEDModel
from speedasr.nemo.archive import CONFIG_MEMBER, WEIGHTS_MEMBER
from speedasr.nemo.import_nemo import key_map
from speedasr.nn.positions import sinusoidal_positions

NEMO_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "dropout": ("encoder", "dropout"),
    "xscaling": ("encoder", "xscaling"),
    "label_smoothing": ("loss", "label_smoothing"),
    "max_decoder_positions": ("transf_decoder", "config_dict", "max_sequence_length"),
}
"""``ModelConfig`` field -> the NeMo config key import-nemo reads it from (the settings a model can
change without changing its tensors' shapes)."""
NOT_FOR_NEMO = frozenset({"attention_backend", "conv_norm_frozen"})
"""Settings of how speedasr runs or trains the model, with nothing for NeMo to store."""

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


def check_out_file(out: Path, overwrite: bool) -> None:
    """``UserError`` if ``out`` is a directory, or an existing file and not ``overwrite``."""
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give the .nemo file to write")
    if out.exists() and not overwrite:
        raise UserError(f"--out '{out}' exists: give a new file, or --overwrite to replace it")


def export_nemo(ckpt_path: str | Path, out_path: str | Path, overwrite: bool = False) -> Exported:
    """Write ``out_path`` (a ``.nemo``) from an ``import-nemo`` checkpoint or a fine-tuning
    run's checkpoint of one. An existing ``out_path`` is a ``UserError`` unless ``overwrite``."""
    from speedasr.nemo.import_nemo import load_imported

    out = Path(out_path)
    check_out_file(out, overwrite)  # before the checkpoint is read: it may be gigabytes
    model, ckpt = load_imported(ckpt_path)
    if model.cfg.subsampling != "dw_striding":
        raise UserError(
            f"checkpoint '{ckpt_path}' has model.subsampling={model.cfg.subsampling!r}: NeMo's "
            "Canary has only dw_striding (FastConformer) subsampling, so export-nemo cannot "
            "write it"
        )
    nemo = ckpt.get("nemo")
    if not isinstance(nemo, dict) or "config" not in nemo or "files" not in nemo:
        raise UserError(
            f"checkpoint '{ckpt_path}' was not made by speedasr import-nemo or a run initialised "
            "from one (it holds no NeMo config and tokenizer files to write back)"
        )
    config_bytes, changed = updated_config(ckpt_path, model, nemo)
    state = nemo_state_dict(model, yaml.safe_load(config_bytes))
    weights = io.BytesIO()
    torch.save(state, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(nemo["files"].items()):
            _add(tar, name, data, now)
        _add(tar, CONFIG_MEMBER, config_bytes, now)
        _add(tar, WEIGHTS_MEMBER, weights.getvalue(), now)
    tmp.replace(out)
    return Exported(out, changed)


class Exported(NamedTuple):
    path: Path
    """The ``.nemo`` written."""
    changed: list[str]
    """NeMo config keys written with the checkpoint's value, as ``key: old -> new``."""


def updated_config(ckpt_path: str | Path, model: AEDModel, nemo: dict) -> tuple[bytes, list[str]]:
    """The original NeMo config with the model settings that changed since the import written
    into it (``NEMO_CONFIG_KEYS``), and those changes; unchanged: the original bytes. A changed
    setting NeMo's config cannot state is a ``UserError`` naming it (the ``.nemo`` would compute
    something else than the checkpoint)."""
    from speedasr.nemo.archive import NemoArchive
    from speedasr.nemo.import_nemo import model_config

    config = yaml.safe_load(nemo["config"])
    archive = NemoArchive(Path(str(nemo.get("source", ckpt_path))), config, nemo["config"], {})
    cfg = model.cfg
    original = asdict(model_config(archive, vocab_size=cfg.vocab_size, pad_id=cfg.pad_id))
    now = asdict(cfg)
    changed = [k for k in now if now[k] != original[k] and k not in NOT_FOR_NEMO]
    unmapped = [k for k in changed if k not in NEMO_CONFIG_KEYS]
    if unmapped:
        named = ", ".join(f"model.{k} {original[k]!r} -> {now[k]!r}" for k in unmapped)
        raise UserError(
            f"checkpoint '{ckpt_path}' changed model settings that a NeMo config cannot state "
            f"({named}); export-nemo writes only models NeMo computes the same way"
        )
    if not changed:
        return nemo["config"], []
    notes = []
    for key in changed:
        *parents, leaf = NEMO_CONFIG_KEYS[key]
        section = config
        for name in parents:
            section = section.setdefault(name, {})
        notes.append(f"{'.'.join(NEMO_CONFIG_KEYS[key])}: {section.get(leaf)!r} -> {now[key]!r}")
        section[leaf] = now[key]
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode(), notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt", nargs="?",
        help="a checkpoint written by speedasr import-nemo (model.ckpt) or by a run fine-tuning "
        "one (init_from), e.g. exp/run/checkpoints/last.ckpt",
    )  # fmt: skip
    parser.add_argument("--ckpt", dest="ckpt_option", help="the checkpoint, as an option")
    parser.add_argument("--out", required=True, help="the .nemo file to write (a new file)")
    parser.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true",
        help="replace an existing --out file",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if (args.ckpt is None) == (args.ckpt_option is None):
        raise UserError("give the checkpoint once: speedasr export-nemo CKPT --out MODEL.nemo")
    ckpt = args.ckpt or args.ckpt_option
    out, changed = export_nemo(ckpt, args.out, overwrite=args.overwrite)
    if changed:
        print(f"config settings changed since the import, written: {'; '.join(changed)}")
    print(f"exported {ckpt} to {out} (NeMo EncDecMultiTaskModel.restore_from reads it)")
    return 0
