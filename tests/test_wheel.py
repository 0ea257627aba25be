"""The built wheel is complete: installed on its own (not editable), every module of the source
tree imports from it, and `speedasr train` + `speedasr eval` run end to end from it.

The wheel is installed with ``pip install --target`` into a folder that the check runs with
``python -S``: no site-packages processing, so the editable install of this checkout (a ``.pth``
finder that would quietly supply any module the wheel lacks) is out of the picture; the
dependencies come from the environment's site-packages, added to ``PYTHONPATH`` after the folder.

The core install (no extras) is checked the same way against a view of site-packages without the
optional packages (triton, nvidia-ml-py, espeakng-loader, matplotlib): links to every other entry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_tiny_cuts, tiny_texts

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "speedasr", "kernels")


def source_modules() -> set[str]:
    """Import names of every module in the source tree (kernels/ installs as speedasr.kernels)."""
    names = set()
    folders = {"speedasr": ROOT / "speedasr", "speedasr.kernels": ROOT / "kernels"}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return names


IMPORT_ALL = """\
import importlib, json, pkgutil, sys
import speedasr
installed = sys.argv[1]
names = ["speedasr"] + [m.name for m in pkgutil.walk_packages(speedasr.__path__, "speedasr.")]
files = {}
for name in names:
    module = importlib.import_module(name)
    files[name] = module.__file__
print(json.dumps({"installed": installed, "files": files}))
"""


def run_installed(
    site: Path, *args: str, cwd: Path, packages: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -S ARGS`` seeing the wheel's folder first, then the environment's packages (or
    ``packages`` instead)."""
    env_paths = sysconfig.get_paths()
    deps = [str(packages)] if packages else [env_paths["purelib"], env_paths["platlib"]]
    paths = [str(site), *deps]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    return subprocess.run(
        [sys.executable, "-S", *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel, built from a clean copy of the sources (no stale build/ folder can add files)
    and installed into its own folder."""
    root = tmp_path_factory.mktemp("wheel")
    (root / "src").mkdir()
    for name in SOURCES:
        src = ROOT / name
        if not src.exists():
            continue  # e.g. no setup.py: then the build's own package discovery is what is tested
        if src.is_dir():
            shutil.copytree(src, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / "src" / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-index", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(root / "dist"), str(root / "src")], check=True, timeout=300)
    (wheel,) = (root / "dist").glob("speedasr-*.whl")
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site")]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    return root / "site"


@pytest.mark.slow
def test_every_module_imports_from_the_installed_wheel(installed, tmp_path):
    proc = run_installed(installed, "-c", IMPORT_ALL, str(installed), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = json.loads(proc.stdout.splitlines()[-1])["files"]
    assert sorted(files) == sorted(source_modules())  # a subpackage left out of the wheel fails
    elsewhere = {name: f for name, f in files.items() if not Path(f).is_relative_to(installed)}
    assert elsewhere == {}
    assert (installed / "speedasr/py.typed").is_file()
    assert (installed / "speedasr/prep/assets/corpus_words.txt").is_file()


@pytest.mark.slow
def test_train_and_eval_run_from_the_installed_wheel(installed, tmp_path):
    make_tiny_cuts(tmp_path / "data", n=4, seed=0)
    Tokenizer.train(tiny_texts(100, seed=1), tmp_path / "tok", vocab_size=64)
    cuts = str(tmp_path / "data/cuts.jsonl.gz")
    script = str(installed / "bin/speedasr")  # the console script the wheel installs
    train = run_installed(
        installed, script, "train", "--out_dir", "exp", "--data.train_cuts", cuts,
        "--data.tokenizer", str(tmp_path / "tok"), "--data.num_workers=0",
        "--model.d_model=32", "--model.encoder_layers=1", "--model.encoder_heads=2",
        "--model.decoder_layers=1", "--model.subsampling_channels=8",
        "--trainer.max_steps=1", "--trainer.max_epochs=null", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--monitors.padding=false",
        "--monitors.gpu=false", "--monitors.throughput=false", cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = tmp_path / "exp/checkpoints/last.ckpt"
    evaluate = run_installed(
        installed, script, "eval", "--ckpt", str(ckpt), "--cuts", cuts, "--quiet",
        "--json", "summary.json", cwd=tmp_path,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["utterances"] == 4


OPTIONAL = ("triton", "nvidia-ml-py", "espeakng-loader", "matplotlib")
"""The distributions of the extras (pyproject.toml; tests/test_extras.py keeps them in step)."""


@pytest.fixture(scope="module")
def core_packages(tmp_path_factory) -> Path:
    """The environment's site-packages less the optional distributions' files and this
    checkout's editable install: a folder of links to everything else."""
    from importlib.metadata import distribution

    left_out = {"__pycache__"}  # shared by several distributions; holds no importable module
    excluded: set[str] = set()
    for name in OPTIONAL:
        excluded |= {f.parts[0] for f in distribution(name).files if f.parts[0] != ".."}
    excluded -= left_out
    view = tmp_path_factory.mktemp("core-site")
    purelib = Path(sysconfig.get_paths()["purelib"])
    for entry in purelib.iterdir():
        if entry.name in excluded or entry.name.startswith(("__editable__", "speedasr")):
            continue
        (view / entry.name).symlink_to(entry)
    return view


CORE_RUN = """\
import contextlib, importlib.util, io, json, sys
from speedasr.cli import main
absent = [m for m in ("triton", "pynvml", "espeakng_loader", "matplotlib")
          if importlib.util.find_spec(m) is None]
results = {"absent": absent}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results[name] = [code, err.getvalue().splitlines()[-1:]]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_core_install_trains_and_evaluates_on_cpu_and_names_the_extra_for_the_rest(
    installed, core_packages, tmp_path
):
    make_tiny_cuts(tmp_path / "data", n=4, seed=0)
    Tokenizer.train(tiny_texts(100, seed=1), tmp_path / "tok", vocab_size=64)
    cuts = str(tmp_path / "data/cuts.jsonl.gz")
    train = [
        "train", "--data.train_cuts", cuts,
        "--data.tokenizer", str(tmp_path / "tok"), "--data.num_workers=1",
        "--model.d_model=32", "--model.encoder_layers=1", "--model.encoder_heads=2",
        "--model.decoder_layers=1", "--model.subsampling_channels=8",
        "--trainer.max_steps=1", "--trainer.max_epochs=null", "--trainer.accelerator=cpu",
        "--monitors.padding=false", "--monitors.throughput=false",
    ]  # fmt: skip
    commands = {  # in one process, one after the other
        "train": [*train, "--out_dir", "exp"],
        "eval": ["eval", "--ckpt", "exp/checkpoints/last.ckpt", "--cuts", cuts, "--quiet",
                 "--json", "eval.json"],
        "triton": [*train, "--out_dir", "exp-triton", "--model.attention_backend=triton"],
        "synth": ["data", "synth", "--out", "corpus", "--hours", "0.01"],
        "profile": ["profile", "--log-dir", "exp"],
    }  # fmt: skip
    proc = run_installed(
        installed, "-c", CORE_RUN, json.dumps(commands), cwd=tmp_path, packages=core_packages
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    assert results.pop("absent") == ["triton", "pynvml", "espeakng_loader", "matplotlib"]
    assert results.pop("train")[0] == 0, proc.stderr[-3000:]
    assert (tmp_path / "exp/checkpoints/last.ckpt").is_file()
    assert "leaked" not in proc.stderr  # no triton: no nanobind leak report at exit
    assert results.pop("eval")[0] == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["utterances"] == 4
    extras = {"triton": "gpu", "synth": "demo", "profile": "plots"}
    for name, (code, last_line) in results.items():
        assert code == 2, (name, last_line)
        assert last_line[0].endswith(f"pip install 'speedasr[{extras[name]}]'"), (name, last_line)
    assert not (tmp_path / "corpus").exists()
