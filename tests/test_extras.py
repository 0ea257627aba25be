"""Optional dependencies: pyproject's extras match speedasr.extras, and without each optional
package the command that needs it is one line naming the extra while the rest keeps working.

A missing package is simulated with ``sys.modules[name] = None`` (an import of it then raises
ImportError); tests/test_wheel.py runs the installed wheel where the packages are really absent.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch

from speedasr.cli import main
from speedasr.errors import UserError
from speedasr.extras import EXTRAS, MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """``"triton>=3.0,<4; platform..."`` -> ``"triton"``; ``"speedasr[gpu]"`` -> ``"speedasr"``."""
    for i, c in enumerate(requirement):
        if c in "<>=!~;[ ":
            return requirement[:i].lower()
    return requirement.lower()


def block(monkeypatch, module: str, *loaded: str) -> None:
    """Make ``import module`` fail, and forget ``loaded`` modules that imported it already."""
    monkeypatch.setitem(sys.modules, module, None)
    for name in loaded:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_pyproject_extras_are_the_ones_speedasr_names():
    extras = PROJECT["optional-dependencies"]
    named = {(dist, extra) for dist, extra in EXTRAS.values()}
    listed = {(_name(r), e) for e in ("gpu", "demo", "plots") for r in extras[e]}
    assert named == listed
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert core.isdisjoint(dist for dist, _ in named)  # optional means: not in the core install
    assert {"speedasr"} <= {_name(r) for r in extras["dev"]}  # make setup: demo and tests need all
    assert "speedasr[gpu,demo,plots]" in extras["dev"]


def test_every_requirement_has_an_upper_bound():
    requirements = [*PROJECT["dependencies"]]
    for items in PROJECT["optional-dependencies"].values():
        requirements += [r for r in items if _name(r) != "speedasr"]
    unbounded = [r for r in requirements if "<" not in r.split(";")[0]]
    assert unbounded == []


def test_missing_extra_is_a_user_error_and_an_import_error(monkeypatch):
    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingExtraError) as info:
        require("matplotlib", "plotting")
    assert isinstance(info.value, UserError) and isinstance(info.value, ImportError)
    assert str(info.value) == (
        "plotting needs matplotlib, which the core install leaves out: "
        "pip install 'speedasr[plots]'"
    )


def _qkv(n: int = 5):
    torch.manual_seed(0)
    q, k, v = (torch.randn(n, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 2, n], dtype=torch.int32)
    return q, k, v, cu


def test_without_triton_the_default_attention_runs_and_triton_names_the_extra(monkeypatch):
    from speedasr.nn.attention import packed_attention

    block(
        monkeypatch,
        "triton",
        "speedasr.kernels.flash_varlen",
        "speedasr.kernels.flash_varlen_kernels",
    )
    q, k, v, cu = _qkv()
    out = packed_attention(q, k, v, cu, cu, 3, 3, causal=True)  # auto: torch on CPU
    ref = packed_attention(q, k, v, cu, cu, 3, 3, causal=True, backend="torch")
    assert torch.equal(out, ref)
    with pytest.raises(MissingExtraError, match=r"^attention backend 'triton' .*needs triton.*"
                       r"pip install 'speedasr\[gpu\]'$"):  # fmt: skip
        packed_attention(q, k, v, cu, cu, 3, 3, causal=True, backend="triton")


def test_without_espeak_synth_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    block(monkeypatch, "espeakng_loader")
    out = tmp_path / "corpus"
    code = main(["data", "synth", "--out", str(out), "--hours", "0.01"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "speedasr data synth: error: synthesizing the speech corpus needs espeakng-loader, which "
        "the core install leaves out: pip install 'speedasr[demo]'\n"
    )
    assert not out.exists()  # refused before writing anything

    from speedasr.prep.espeak import Espeak

    with pytest.raises(MissingExtraError, match=r"speedasr\[demo\]"):
        Espeak()  # the engine itself (speedasr.testing's speech=True cuts use it)


def test_without_matplotlib_profile_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    block(monkeypatch, "matplotlib", "speedasr.profile.plots")
    code = main(["profile", "--log-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "speedasr profile: error: plotting the profile needs matplotlib, which the core install "
        "leaves out: pip install 'speedasr[plots]'\n"
    )


def test_without_nvml_the_gpu_monitor_warns_once_and_stays_off(monkeypatch):
    from speedasr.train.callbacks import GPUUtilizationMonitor

    block(monkeypatch, "pynvml")
    monitor = GPUUtilizationMonitor()
    on_cuda = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.warns(UserWarning, match=r"NVML unavailable.*pip install 'speedasr\[gpu\]'"):
        monitor.on_train_start(on_cuda, None)
    assert monitor._sampler is None
