"""Reading a ``.nemo`` file safely: a tar holding ``model_config.yaml``, ``model_weights.ckpt``
and tokenizer files (docs/canary.md §1).

Nothing is extracted into the user's tree: members are read through ``tarfile.extractfile`` by
name, only regular files are read, and the weights go to a private temporary directory under a
fixed name (so no member name can point outside it). The weights are loaded with
``torch.load(weights_only=True)`` and the config with ``yaml.safe_load``: a hostile file cannot run
code.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from speedasr.errors import UserError

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"
TIMESTAMPS_PREFIX = "timestamps_asr_model_"
"""Members of the optional auxiliary CTC model NeMo uses for timestamps (docs/canary.md §1):
not read (they can be as large as the model); NeMo restores a .nemo without them."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class NemoArchive:
    """What a ``.nemo`` holds: its config (as saved), its state dict, and its other top-level
    files by name (tokenizer models and vocabularies)."""

    path: Path
    config: dict
    config_bytes: bytes
    state_dict: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    """Members not read (the auxiliary timestamps model)."""


def _member_name(name: str) -> str:
    """``./x`` and ``x`` -> ``x``; anything in a folder or with an unsafe name -> ``""``."""
    name = name.removeprefix("./")
    return name if _SAFE_NAME.match(name) else ""


def read_nemo(path: str | Path) -> NemoArchive:
    """Read ``path``; ``UserError`` naming it and what is wrong if it is not a ``.nemo``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist (expected a NeMo .nemo file)")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError):
        raise UserError(f"'{path}' is not a .nemo file: it is not a tar archive") from None
    with tar, tempfile.TemporaryDirectory(prefix="speedasr-nemo-") as tmp:
        members = {}
        skipped = []
        for member in tar.getmembers():
            name = _member_name(member.name)
            if name.startswith(TIMESTAMPS_PREFIX):
                skipped.append(name)
            elif name and member.isfile():
                members[name] = member
        missing = [m for m in (CONFIG_MEMBER, WEIGHTS_MEMBER) if m not in members]
        if missing:
            raise UserError(f"'{path}' is not a .nemo file: it has no {' and no '.join(missing)}")
        config_bytes = tar.extractfile(members[CONFIG_MEMBER]).read()
        try:
            config = yaml.safe_load(config_bytes)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise UserError(f"'{path}': {CONFIG_MEMBER} is not valid YAML ({first})") from None
        if not isinstance(config, dict):
            raise UserError(f"'{path}': {CONFIG_MEMBER} is not a mapping")
        weights = Path(tmp) / "weights.ckpt"  # a fixed name: no member name reaches the disk
        with tar.extractfile(members[WEIGHTS_MEMBER]) as src, weights.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        try:
            # mmap: a multi-GB state dict is paged in from the temporary file, not copied to RAM
            # twice (the mapping outlives the file's deletion on POSIX systems).
            state = _load_weights(weights)
        except Exception as e:  # weights_only refusals and corrupt files raise many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"'{path}': {WEIGHTS_MEMBER} is not a plain state dict loadable with "
                f"weights_only=True ({first})"
            ) from None
        if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint inside
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise UserError(f"'{path}': {WEIGHTS_MEMBER} is not a dict of tensors")
        files = {
            name: tar.extractfile(member).read()
            for name, member in members.items()
            if name not in (CONFIG_MEMBER, WEIGHTS_MEMBER)
        }
    return NemoArchive(path, config, config_bytes, state, files, skipped)


def _load_weights(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # torch's legacy (non-zip) format cannot be mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def artifact_name(reference: object) -> str | None:
    """``"nemo:abc_tokenizer.model"`` -> ``"abc_tokenizer.model"`` (a file inside the archive);
    other paths -> their file name (NeMo resolves them the same way when restoring)."""
    if not isinstance(reference, str):
        return None
    return Path(reference.removeprefix("nemo:")).name
