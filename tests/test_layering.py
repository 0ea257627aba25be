"""Import rules of the package layout (docs/architecture.md): layers import only downward, no
module imports itself through a circle, every shared constant has one home.

Every module under ``speedasr/`` and ``kernels/`` (installed as ``speedasr.kernels``) is parsed
with ``ast``; nothing is imported, so this runs in a second. Every import counts, wherever it is
written (module level, inside a function, under ``if TYPE_CHECKING:``): a lazy or type-only import
is still knowledge of the layer above. Circles are counted over the imports that run, so
``TYPE_CHECKING`` imports are left out of them.

``python tests/test_layering.py [REPO]`` prints the numbers for any checkout (the issue 16 note
gives them before and after the move).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    # (rank, group, module prefixes). A module may import its own group and any group of a lower
    # rank; groups of the same rank (data and nn) may not import each other.
    (0, "core", ("speedasr.core",)),
    (1, "base", ("speedasr.errors", "speedasr.console", "speedasr.extras", "speedasr.options")),
    (2, "kernels", ("speedasr.kernels",)),
    (3, "data", ("speedasr.data",)),
    (3, "nn", ("speedasr.nn",)),
    (4, "prep", ("speedasr.prep",)),
    (4, "models", ("speedasr.models", "speedasr.nemo", "speedasr.checkpoint")),
    (5, "decoding", ("speedasr.decoding", "speedasr.metrics")),
    (6, "profile", ("speedasr.profile",)),
    # speedasr.profile.testing is a toy Lightning project that runs the training callbacks
    # (`python -m speedasr.profile.testing`, docs/profiling.md): test support above train.
    (
        7,
        "train",
        ("speedasr.train", "speedasr.config", "speedasr.testing", "speedasr.profile.testing"),
    ),
    (8, "app", ("speedasr.api", "speedasr.evaluate", "speedasr.export", "speedasr.inference")),
    (9, "bench", ("speedasr.bench",)),
    (10, "cli", ("speedasr.cli", "speedasr")),
)
"""The layer order, bottom first. ``base`` is the few dependency-free helpers every layer uses (the
``UserError`` type, console logging, optional-extra checks, CLI option conventions); ``core``
imports nothing of ours at all. ``prep`` (offline data preparation: synthesis, importers, Shar
export, tokenizer training) reads and writes what ``data`` defines; batching never imports it.
``profile`` holds the measurement pieces the training callbacks use, so it sits below ``train``;
``bench`` drives training and inference, so it sits above them."""

COMPAT_PATHS: dict[str, str] = {"speedasr.data.corpus": "speedasr.prep.corpus"}
"""Old module paths named by the docs, kept as re-exports of the module that moved up a layer:
such a module may import its new home and nothing else, and holds no code of its own."""

SHARED_CONSTANTS: tuple[tuple[str, ...], ...] = (
    # names that mean one quantity; each group may be defined in one module only
    ("SAMPLE_RATE", "NEMO_SAMPLE_RATE"),
    ("FRAME_SHIFT_SECONDS", "FRAMES_PER_SECOND"),
    (
        "SUBSAMPLING_STAGES",
        "ENCODER_FRAME_SECONDS",
        "INPUT_FRAMES_PER_ENCODER_FRAME",
        "ENCODER_FRAMES_PER_SECOND",
    ),
    ("PROMPT_TOKENS",),
    ("GIB",),
    ("IGNORE_INDEX", "LABEL_IGNORE_INDEX"),
    ("CHARS_PER_TOKEN",),
    ("SHAPES_FILE",),
)
"""Constants of one quantity that were copied under one or several names (names compared
case-insensitively). Other upper-case names may repeat when they mean different things in their
modules (``STRATEGIES`` of two benchmarks, ``DTYPES`` of a CLI)."""


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the deepest module of ours the statement names)
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """Module name -> file, for ``speedasr/`` and ``kernels/`` (as ``speedasr.kernels``)."""
    files = {}
    for package, folder in (
        ("speedasr", repo / "speedasr"),
        ("speedasr.kernels", repo / "kernels"),
    ):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(repo: Path = REPO) -> list[Import]:
    """Every import of one of our modules, in every module."""
    files = module_files(repo)
    found = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        type_lines = _type_checking_lines(tree)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                # `from speedasr.core import batch` names the module speedasr.core.batch
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            for target in dict.fromkeys(targets):
                if target == "speedasr" or target.startswith("speedasr."):
                    found.append(Import(name, target, node.lineno, node.lineno in type_lines))
    return found


def layer_of(module: str) -> tuple[int, str]:
    best = max(
        (
            (len(p), rank, group)
            for rank, group, prefixes in LAYERS
            for p in prefixes
            if module == p or module.startswith(p + ".")
        ),
        default=None,
    )
    if best is None:
        raise ValueError(f"{module} is in no layer of tests/test_layering.py LAYERS")
    return best[1], best[2]


def upward_imports(found: list[Import]) -> list[str]:
    """Imports of a higher layer, or of a sibling group of the same rank, one line each."""
    bad = []
    for imp in found:
        if COMPAT_PATHS.get(imp.source) == imp.target:
            continue
        (rank, group), (target_rank, target_group) = layer_of(imp.source), layer_of(imp.target)
        if group != target_group and target_rank >= rank:
            kind = "upward" if target_rank > rank else "sideways"
            bad.append(
                f"{imp.source} (line {imp.line}) imports {imp.target}: {group} -> "
                f"{target_group} points {kind}"
            )
    return bad


def circles(found: list[Import]) -> list[list[str]]:
    """Modules that import each other through a chain (strongly connected components, size > 1),
    over the imports that run (TYPE_CHECKING ones left out)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in found:
        if not imp.type_only and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def circle_edges(found: list[Import], component: list[str]) -> list[str]:
    members = set(component)
    return sorted(
        f"{imp.source} (line {imp.line}) imports {imp.target}"
        for imp in found
        if not imp.type_only
        and imp.source in members
        and imp.target in members
        and imp.source != imp.target
    )


def constant_definitions(repo: Path = REPO) -> dict[str, list[tuple[str, str]]]:
    """Upper-case module-level name (lower-cased) -> (module, name) of every assignment."""
    defined: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, path in module_files(repo).items():
        for node in ast.parse(path.read_text()).body:
            targets = []
            if isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                targets = [node.target.id]
            for target in targets:
                if target.lstrip("_")[:1].isupper():
                    defined[target.lstrip("_").lower()].append((name, target))
    return defined


def duplicated_constants(repo: Path = REPO) -> list[str]:
    """Each group of ``SHARED_CONSTANTS`` defined in more than one module, one line each (one
    module may derive several names of a group from each other)."""
    defined = constant_definitions(repo)
    bad = []
    for group in SHARED_CONSTANTS:
        where = [d for n in group for d in defined.get(n.lower(), [])]
        if len({module for module, _ in where}) > 1:
            names = ", ".join(f"{module}.{name}" for module, name in where)
            bad.append(f"{group[0]} is defined in {len(where)} places: {names}")
    return bad


def largest_modules(repo: Path = REPO, top: int = 5) -> list[tuple[int, str]]:
    sizes = [(len(p.read_text().splitlines()), n) for n, p in module_files(repo).items()]
    return sorted(sizes, reverse=True)[:top]


def test_imports_point_down():
    bad = upward_imports(imports())
    assert not bad, "imports against the layer order (tests/test_layering.py LAYERS):\n" + (
        "\n".join(bad)
    )


def test_no_import_circles():
    found = imports()
    bad = [" <-> ".join(c) + ":\n  " + "\n  ".join(circle_edges(found, c)) for c in circles(found)]
    assert not bad, "import circles:\n" + "\n".join(bad)


def test_core_imports_nothing_of_ours():
    bad = [
        f"{imp.source} (line {imp.line}) imports {imp.target}"
        for imp in imports()
        if imp.source.startswith("speedasr.core") and not imp.target.startswith("speedasr.core")
    ]
    assert not bad, "speedasr.core must import nothing else of speedasr:\n" + "\n".join(bad)


def test_shared_constants_defined_once():
    bad = duplicated_constants()
    assert not bad, "constants with more than one home:\n" + "\n".join(bad)


def test_compat_paths_only_re_export():
    files = module_files()
    for old, new in COMPAT_PATHS.items():
        tree = ast.parse(files[old].read_text())
        body = [node for node in tree.body if not isinstance(node, ast.Expr)]  # docstring
        imports_ = [n for n in body if isinstance(n, ast.ImportFrom)]
        rest = [n for n in body if n not in imports_ and not _is_all(n)]
        assert [n.module for n in imports_] == [new] and not rest, (
            f"{old} must only re-export {new}"
        )


def _is_all(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]


def test_every_module_has_a_layer():
    for name in module_files():
        layer_of(name)


def test_the_checks_see_what_they_must(tmp_path):
    """On a small tree: a lazy upward import, a sideways one, a circle through function-level
    imports, a type-only import (direction only) and a copied constant are all reported."""
    files = {
        "speedasr/__init__.py": "",
        "speedasr/core/__init__.py": "",
        "speedasr/core/geometry.py": "SAMPLE_RATE = 16000\n",
        "speedasr/data/__init__.py": "",
        "speedasr/data/a.py": "def f():\n    from speedasr.train import b\n",
        "speedasr/data/c.py": "from ..nn import d\nSAMPLE_RATE = 16000\n",
        "speedasr/nn/__init__.py": "",
        "speedasr/nn/d.py": "def g():\n    import speedasr.nn.e\n",
        "speedasr/nn/e.py": "import speedasr.nn.d\n",
        "speedasr/train/__init__.py": "",
        "speedasr/train/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from speedasr.cli import x\n",
        "kernels/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = imports(tmp_path)
    bad = upward_imports(found)
    assert any("speedasr.data.a (line 2) imports speedasr.train.b" in b for b in bad)
    assert any(
        "speedasr.data.c (line 1) imports speedasr.nn.d" in b and "sideways" in b for b in bad
    )
    assert any("speedasr.train.b (line 3) imports speedasr.cli" in b for b in bad)
    assert circles(found) == [["speedasr.nn.d", "speedasr.nn.e"]]
    assert duplicated_constants(tmp_path) == [
        "SAMPLE_RATE is defined in 2 places: speedasr.core.geometry.SAMPLE_RATE, "
        "speedasr.data.c.SAMPLE_RATE"
    ]


def report(repo: Path) -> str:
    found = imports(repo)
    up = upward_imports(found)
    circ = circles(found)
    lines = [f"imports of ours: {len(found)}", f"upward/sideways imports: {len(up)}"]
    lines += [f"  {u}" for u in up]
    lines.append(f"circles: {len(circ)}")
    lines += [f"  {' <-> '.join(c)}" for c in circ]
    dup = duplicated_constants(repo)
    lines.append(f"constants defined more than once: {len(dup)}")
    lines += [f"  {d}" for d in dup]
    lines.append("largest modules: " + ", ".join(f"{n} ({s})" for s, n in largest_modules(repo)))
    over = [(s, n) for s, n in largest_modules(repo, top=1000) if s > 500]
    lines.append(f"modules over 500 lines: {len(over)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO))
