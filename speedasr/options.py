"""Command-line conventions shared by every ``speedasr`` command (docs/cli.md).

* **Config overrides** are dotted flags, ``--SECTION.KEY=VALUE`` (or ``--SECTION.KEY VALUE``), as
  in ``speedasr train``: ``--model.d_model=256 --model.tie_embeddings=false``. A command that takes
  them registers its sections with ``add_config_overrides``; values are typed from the config
  dataclass's field types by jsonargparse (the parser ``train`` uses, so ``true``/``false``,
  ``null``, ``[1, 2]`` read the same everywhere). An unknown key or a value of the wrong type is a
  ``UserError`` naming it (with the closest key for a typo).
* **Flag spelling**: options are written with dashes (``--check-audio``); the underscore spelling
  (``--check_audio``) is accepted for every one of them. Config keys keep their underscores.
* **dtypes**: ``float32``, ``bfloat16``, ``float16`` (torch's names, shown in help), with the short
  names ``fp32``, ``bf16``, ``fp16`` accepted everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

from speedasr.errors import UserError

# --- dtypes --------------------------------------------------------------------------------------
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}  # fmt: skip
"""Every accepted dtype name -> its canonical (torch) name."""
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def dtype_name(text: str) -> str:
    """The canonical name of a dtype given as ``bf16``/``bfloat16`` etc. (an argparse ``type``)."""
    name = DTYPE_ALIASES.get(str(text).strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype '{text}'; choose float32 (fp32), bfloat16 (bf16) or float16 (fp16)"
        )
    return name


def add_dtype_argument(
    parser, default: str, help: str, choices: tuple[str, ...] = DTYPE_NAMES
) -> None:
    """``--dtype`` taking ``choices`` by canonical name or short alias; ``args.dtype`` is
    canonical. ``parser`` may be an argument group."""
    parser.add_argument("--dtype", type=dtype_name, choices=choices, default=default, help=help)


# --- counts (parameters, FLOPs) -----------------------------------------------------------------
def human_count(n: float) -> str:
    """``1.03B``, ``30.3M``, ``512``: three significant digits."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(float(f"{n:.3g}")) >= scale:
            return f"{float(f'{n / scale:.3g}'):g}{unit}"
    return f"{n:.3g}"


def parse_count(text: str, what: str) -> float:
    """A positive count written ``30M``, ``1.5B``, ``2k`` or ``1e21`` (k, M, B or G, T: powers of
    1000); ``UserError`` naming ``what`` (the flag) otherwise."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except (ValueError, KeyError):
        raise UserError(f"cannot read {what} '{text}' (e.g. 30M, 1B, 1e21)") from None
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{what} must be a positive number, got '{text}'")
    return value


# --- config overrides ----------------------------------------------------------------------------
Sections = Mapping[str, type]
"""Section (the first part of a dotted key) -> config dataclass: ``{"model": ModelConfig}``."""


@dataclasses.dataclass
class Overrides:
    """Parsed ``--SECTION.KEY=VALUE`` flags, in command-line order (a later one wins)."""

    values: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Section -> {key: typed value}; a key inside a nested dataclass is dotted (``a.b``)."""
    args: list[str] = dataclasses.field(default_factory=list)
    """The same, as ``--SECTION.KEY=VALUE`` strings for a jsonargparse parser (``train``'s)."""

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.values.get(name, {}))


def dataclass_sections(root: type) -> dict[str, type]:
    """The sections of a config made of dataclasses: ``TrainConfig`` -> ``{"data": DataConfig,
    "sampler": SamplerConfig, "model": ModelConfig, ...}`` (its dataclass-typed fields)."""
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in dataclasses.fields(root)
            if dataclasses.is_dataclass(hints[f.name])}  # fmt: skip


def config_keys(sections: Sections) -> dict[str, Any]:
    """Every overridable dotted key -> its type annotation (nested dataclasses recursed into)."""
    keys: dict[str, Any] = {}

    def walk(prefix: str, cls: type) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            if name not in {f.name for f in dataclasses.fields(cls)}:
                continue
            if dataclasses.is_dataclass(tp):
                walk(f"{prefix}{name}.", tp)
            else:
                keys[f"{prefix}{name}"] = tp

    for section, cls in sections.items():
        walk(f"{section}.", cls)
    return keys


def describe_type(tp: Any) -> str:
    """A type annotation in words: ``int | None`` -> ``an integer or null``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        none = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(parts) + none
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list like [1, 2] ({getattr(tp, '__name__', tp)})"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(tp, str(tp))


def parse_overrides(items: list[tuple[str, str]], sections: Sections) -> Overrides:
    """``[(dotted key, text value)]`` -> typed ``Overrides``; ``UserError`` for an unknown key
    (with the closest one) or a value that is not of the field's type."""
    out = Overrides()
    if not items:
        return out
    from jsonargparse import ArgumentError, ArgumentParser

    keys = config_keys(sections)
    parser = ArgumentParser(exit_on_error=False, default_meta=False)
    for section, cls in sections.items():
        parser.add_class_arguments(cls, section, fail_untyped=True)
    for key, value in items:
        if key not in keys:
            raise UserError(_unknown_key(key, keys, sections))
        try:
            typed = parser.parse_args([f"--{key}={value}"])[key]
        except ArgumentError:
            raise UserError(
                f"--{key}={value}: expected {describe_type(keys[key])}, got '{value}'"
            ) from None
        section, _, rest = key.partition(".")
        out.values.setdefault(section, {})[rest] = typed
        out.args.append(f"--{key}={value}")
    return out


def _unknown_key(key: str, keys: Mapping[str, Any], sections: Sections) -> str:
    section, _, rest = key.partition(".")
    same = [k.partition(".")[2] for k in keys if k.startswith(f"{section}.")]
    if same:  # a known section: compare the key alone, or every key shares the section's letters
        close = [f"{section}.{k}" for k in difflib.get_close_matches(rest, same, n=1)]
    else:
        close = difflib.get_close_matches(key, list(keys), n=1)
    if close:
        return f"unknown config key --{key}; did you mean --{close[0]}?"
    names = ", ".join(f"{s} ({c.__name__})" for s, c in sections.items())
    return f"unknown config key --{key}; this command takes --SECTION.KEY=VALUE for {names}"


def add_config_overrides(
    parser: argparse.ArgumentParser,
    sections: Sections | Callable[[], Sections],
    example: str,
    deprecated_set_section: str | None = None,
) -> None:
    """Let ``parser`` (a ``speedasr.options.ArgumentParser``) take ``--SECTION.KEY=VALUE`` flags
    for ``sections`` (a mapping, or a function giving one when flags are parsed); they arrive as
    ``args.overrides`` (``Overrides``). ``--set KEY=VALUE ...`` is still read for one release, with
    a deprecation note; a bare KEY there belongs to ``deprecated_set_section``."""
    if not isinstance(parser, ArgumentParser):
        raise TypeError("config overrides need speedasr.options.ArgumentParser")
    parser.override_sections = sections
    parser.deprecated_set_section = deprecated_set_section
    named = sections if isinstance(sections, Mapping) else {}
    what = (
        ", ".join(f"{s}: {c.__name__}" for s, c in named.items())
        or "the sections and keys of `speedasr train --help`"
    )
    keys = [key.partition(".")[2] for key in config_keys(named)]
    listed = f"; keys: {', '.join(keys)}" if len(named) == 1 and len(keys) <= 30 else ""
    parser.add_argument_group(
        "config overrides",
        description=f"--SECTION.KEY=VALUE sets a config field ({what}), typed as "
        f"in `speedasr train` (true/false, null, numbers, strings), e.g. {example}{listed}",
    )
    parser.set_defaults(overrides=Overrides())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with speedasr's conventions: ``--x_y`` is read as ``--x-y``, and dotted config
    overrides are taken out before argparse sees them (``add_config_overrides``)."""

    override_sections: Sections | Callable[[], Sections] | None = None
    deprecated_set_section: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        args = self._dash_spelling(args)
        items: list[tuple[str, str]] = []
        if self.override_sections is not None:
            args, items = self._take_overrides(args)
        namespace, extras = super().parse_known_args(args, namespace)
        if self.override_sections is not None:
            sections = self.override_sections
            namespace.overrides = parse_overrides(
                items, sections if isinstance(sections, Mapping) else sections()
            )
        return namespace, extras

    def _dash_spelling(self, args: list[str]) -> list[str]:
        out = []
        for i, a in enumerate(args):
            if a == "--":
                return out + args[i:]
            flag, sep, value = a.partition("=")
            dashed = flag.replace("_", "-")
            if (
                flag.startswith("--") and "." not in flag and "_" in flag
                and flag not in self._option_string_actions
                and dashed in self._option_string_actions
            ):  # fmt: skip
                a = dashed + sep + value
            out.append(a)
        return out

    def _take_overrides(self, args: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
        rest, items, i = [], [], 0
        while i < len(args):
            a = args[i]
            if a == "--":
                rest += args[i:]
                break
            if a == "--set":
                i, set_items = self._take_deprecated_set(args, i + 1)
                items += set_items
                continue
            flag, sep, value = a.partition("=")
            if a.startswith("--") and "." in flag:
                if not sep:
                    if i + 1 >= len(args) or args[i + 1].startswith("--"):
                        raise UserError(f"{flag} needs a value: {flag}=VALUE")
                    value, i = args[i + 1], i + 1
                items.append((flag[2:], value))
            else:
                rest.append(a)
            i += 1
        return rest, items

    def _take_deprecated_set(self, args: list[str], i: int) -> tuple[int, list[tuple[str, str]]]:
        items = []
        while i < len(args) and not args[i].startswith("-") and "=" in args[i]:
            key, _, value = args[i].partition("=")
            if self.deprecated_set_section and "." not in key:
                key = f"{self.deprecated_set_section}.{key}"
            items.append((key, value))
            i += 1
        if not items:
            raise UserError("--set expects KEY=VALUE (deprecated: write --SECTION.KEY=VALUE)")
        new = " ".join(f"--{k}={v}" for k, v in items)
        print(
            f"note: --set is deprecated and goes in the next release; write {new}", file=sys.stderr
        )
        return i, items
