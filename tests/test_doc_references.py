"""Every module and file of ours that the docs name exists: a moved module (issue 16) leaves its
old path in prose that no test imports.

Read: README.md, docs/, recipes/ (Markdown, YAML, shell), tools/ and tests/ Markdown,
pyproject.toml and the Makefile in full; in Python files (speedasr/, kernels/, tests/, tools/,
setup.py) the comments, the docstrings and the ``speedasr`` imports (tools/ scripts run outside
the test suite, so nothing else imports them). Checked:

- a module (``speedasr.train.resume``; ``speedasr.kernels`` is the kernels/ folder), and the first
  name after it when there is one (``speedasr.train.resume.TrainingProgress``): defined or
  imported there;
- a path under one of our folders (``speedasr/``, ``kernels/``, ``tests/``, ``docs/``,
  ``recipes/``, ``tools/``), and a ``.py`` path inside the package written without ``speedasr/``
  (``train/resume.py``), or relative to the file that names it.

Paths in other projects (NeMo's ``asr/modules/...``) and a user's output folders (``exp/``,
``data/tiny``) are not ours and are not checked.

``python tests/test_doc_references.py [REPO] [--symbols]`` lists the broken references of any
checkout and counts them; ``--symbols`` also prints, for review, the names written on the same
line as a file or module that are defined elsewhere (``TrainingProgress`` next to a path that no
longer holds it).
"""

from __future__ import annotations

import ast
import functools
import io
import re
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEXT_FILES = (
    "README.md",
    "docs/*.md",
    "recipes/**/*.md",
    "recipes/**/*.yaml",
    "recipes/**/*.sh",
    "tools/**/*.md",
    "tests/**/*.md",
    "pyproject.toml",
    "Makefile",
)
PYTHON_FILES = ("setup.py", "speedasr/**/*.py", "kernels/**/*.py", "tests/**/*.py", "tools/**/*.py")
OUR_FOLDERS = ("speedasr", "kernels", "tests", "docs", "recipes", "tools")
SUBPACKAGES = ("core", "data", "nn", "models", "decoding", "train", "bench", "profile", "prep")
# examples in the layering test's self-test and the CLI test: modules that must not exist
NOT_MODULES = re.compile(r"speedasr\.(no_such_module|data\.[ac]|nn\.[de]|train\.b)\b")

MODULE = re.compile(r"(?<![\w/.-])speedasr(?:\.[A-Za-z_]\w*)+")
# a path ends before a placeholder (`tests/kernels/test_<name>.py`), which is then not checked
PATH = re.compile(r"(?<![\w/.$<{-])((?:[A-Za-z_][\w.-]*/)+[\w.-]*)(?![\w.-]*[<{*])")


@dataclass(frozen=True)
class Reference:
    file: str
    line: int
    ref: str
    problem: str | None
    target: Path | None  # the file a resolved reference names (a module's file)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.ref}: {self.problem}"


def module_file(repo: Path, dotted: str) -> Path | None:
    parts = dotted.split(".")
    if parts[:2] == ["speedasr", "kernels"]:
        base, rest = repo / "kernels", parts[2:]
    else:
        base, rest = repo / "speedasr", parts[1:]
    path = base.joinpath(*rest)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if rest and path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


@functools.cache
def names_of(path: Path, imports: bool = True) -> set[str]:
    """Names a module defines at any depth (functions, classes, assignments) and, with
    ``imports``, those it imports."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def check_module(repo: Path, ref: str) -> tuple[str | None, Path | None]:
    parts = ref.split(".")
    for n in range(len(parts), 0, -1):
        path = module_file(repo, ".".join(parts[:n]))
        if path is None:
            continue
        rest = parts[n:]
        names = names_of(path)
        # a module __getattr__ (an old name kept for a release) may answer any name
        if not rest or rest[0].startswith("__") or rest[0] in names or "__getattr__" in names:
            return None, path
        return f"{'.'.join(parts[:n])} has no {rest[0]}", path
    return "no such module", None


def check_path(repo: Path, ref: str, source: Path) -> tuple[str | None, Path | None] | None:
    """(problem, file) for a path of ours; None for a path that is not ours."""
    first = ref.split("/")[0]
    if first in OUR_FOLDERS:
        if ref.startswith("speedasr/kernels/"):
            ref = "kernels/" + ref.removeprefix("speedasr/kernels/")
        candidates = [repo / ref]
    elif first in SUBPACKAGES and ref.endswith(".py"):
        candidates = [repo / "speedasr" / ref]
    elif (source.parent / ref).exists():
        candidates = [source.parent / ref]
    else:
        return None
    for c in candidates:
        if c.exists():
            return None, c if c.suffix == ".py" else None
    return "no such file", None


@functools.cache
def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the prose in a file: all of a text file; a Python file's comments,
    docstrings and ``speedasr`` imports (as dotted names)."""
    source = path.read_text()
    if path.suffix != ".py":
        return list(enumerate(source.splitlines(), 1))
    lines = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node, clean=False) is not None:
                doc = node.body[0]
                text = doc.value.value
                lines += [(doc.lineno + i, line) for i, line in enumerate(text.splitlines())]
        elif isinstance(node, ast.Import):
            lines += [(node.lineno, a.name) for a in node.names if a.name.startswith("speedasr")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("speedasr"):
            lines += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return lines


def references(repo: Path = REPO) -> list[Reference]:
    files: set[Path] = set()
    for pattern in (*TEXT_FILES, *PYTHON_FILES):
        files.update(p for p in repo.glob(pattern) if p.is_file())
    found = []
    for path in sorted(files):
        name = str(path.relative_to(repo))
        for lineno, line in text_lines(path):
            for m in MODULE.finditer(line):
                ref = m.group(0)
                if ref in ("speedasr.egg", "speedasr.py") or NOT_MODULES.match(ref):
                    continue
                problem, target = check_module(repo, ref)
                found.append(Reference(name, lineno, ref, problem, target))
            for m in PATH.finditer(line):
                ref = m.group(1).rstrip(".")
                checked = check_path(repo, ref, path)
                if checked is not None:
                    found.append(Reference(name, lineno, ref, *checked))
    return found


def test_named_modules_and_files_exist():
    broken = [str(r) for r in references() if r.problem]
    assert not broken, "\n".join(broken)


def test_the_check_sees_a_moved_module(tmp_path):
    (tmp_path / "speedasr" / "train").mkdir(parents=True)
    (tmp_path / "speedasr" / "__init__.py").write_text("")
    (tmp_path / "speedasr" / "train" / "__init__.py").write_text("")
    (tmp_path / "speedasr" / "train" / "resume.py").write_text("class TrainingProgress: ...\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "`speedasr.train.resume.TrainingProgress` (`train/resume.py`, docs/a.md) is here;\n"
        "`speedasr.train.progress`, `speedasr.train.resume.HeapTrimmer`, `train/progress.py`,\n"
        "`speedasr/train/progress.py` and docs/b.md are not. NeMo's asr/modules/x.py is not ours.\n"
    )
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text(
        '"""Uses ``speedasr.data.sentences``."""\n'
        "from speedasr.train.resume import TrainingProgress  # speedasr/train/resume.py\n"
        "from speedasr.data.sentences import SentenceGenerator\n"
        'PATH = "speedasr/in/a/string.py"\n'
    )
    broken = [(r.file, r.line, r.ref) for r in references(tmp_path) if r.problem]
    assert broken == [
        ("docs/a.md", 2, "speedasr.train.progress"),
        ("docs/a.md", 2, "speedasr.train.resume.HeapTrimmer"),
        ("docs/a.md", 2, "train/progress.py"),
        ("docs/a.md", 3, "speedasr/train/progress.py"),
        ("docs/a.md", 3, "docs/b.md"),
        ("tools/t.py", 1, "speedasr.data.sentences"),
        ("tools/t.py", 3, "speedasr.data.sentences.SentenceGenerator"),
    ]


def _symbol_hints(repo: Path, refs: list[Reference]) -> Iterator[str]:
    """Classes and functions written on a reference's line that the file it names does not hold
    but another module defines at its top level: for review, not a test (a line may name two)."""
    homes: dict[str, list[str]] = {}
    for path in [*repo.glob("speedasr/**/*.py"), *repo.glob("kernels/**/*.py")]:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and len(node.name) > 3:
                homes.setdefault(node.name, []).append(str(path.relative_to(repo)))
    for r in refs:
        if r.target is None or r.problem:
            continue
        held = names_of(r.target)
        for m in re.finditer(
            r"`(\w+)(?:\(\))?`|\b([A-Z][a-z]+[A-Z]\w*)\b", dict(text_lines(repo / r.file))[r.line]
        ):
            name = m.group(1) or m.group(2)
            if name in homes and name not in held:
                where = ", ".join(homes[name])
                yield f"{r.file}:{r.line}: {r.ref} next to {name}, defined in {where}"


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    repo = Path(args[0]).resolve() if args else REPO
    refs = references(repo)
    for r in refs:
        if r.problem:
            print(r)
    if "--symbols" in sys.argv:
        for hint in dict.fromkeys(_symbol_hints(repo, refs)):
            print("check:", hint)
    print(f"{len(refs)} references, {sum(bool(r.problem) for r in refs)} broken")
