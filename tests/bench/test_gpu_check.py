"""`speedasr bench gpu`: the step runner (limits, failures, the summary) and the whole dry run.

The dry run is what CI runs so that the GPU check cannot rot between the rare GPU machines: every
step on CPU with tiny shapes, the kernels in the Triton interpreter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from speedasr.bench import gpu
from speedasr.bench.gpu_training import CONFIGS
from speedasr.cli import main

REPO = Path(__file__).resolve().parents[2]

FAKE_STEPS = """
import subprocess, time

def ok(ctx):
    ctx.record(value=1)

def fails(ctx):
    ctx.fail("a check did not pass")
    ctx.record(value=2)

def raises(ctx):
    ctx.record(partial=True)
    raise RuntimeError("boom")

def hangs(ctx):
    child = subprocess.Popen(["sleep", "60"])  # stands for a data worker the step started
    ctx.record(started=True, child=child.pid)
    time.sleep(60)

def render(results):
    return [f"rendered {sorted(results)}"]
"""


def _fake_step(name: str, function: str, needs: tuple[str, ...] = ()) -> gpu.Step:
    return gpu.Step(name, name.title(), f"fake_steps:{function}", "fake_steps:render", 2, 2, needs)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by init) counts as gone.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" in status.read_text()


def test_failed_erring_and_hung_steps_are_reported_and_the_next_step_runs(tmp_path, monkeypatch):
    (tmp_path / "fake_steps.py").write_text(FAKE_STEPS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))  # the renderers run in this process
    steps = [
        _fake_step("hangs", "hangs"),
        _fake_step("fails", "fails"),
        _fake_step("needs_fails", "ok", needs=("fails",)),
        _fake_step("raises", "raises"),
        _fake_step("ok", "ok"),
    ]
    (tmp_path / "steps").mkdir()
    start = time.perf_counter()
    results = gpu.run_steps(steps, tmp_path / "steps", tmp_path, dry_run=True)
    assert time.perf_counter() - start < 30  # the hung step was stopped at its 2 s limit

    assert {k: r["status"] for k, r in results.items()} == {
        "hangs": "timeout", "fails": "fail", "needs_fails": "skipped", "raises": "error",
        "ok": "ok",
    }  # fmt: skip
    hung = results["hangs"]
    assert hung["results"]["started"] is True  # measured before the limit: kept
    assert 2 <= hung["seconds"] < 15
    assert _gone(hung["results"]["child"])  # the step's whole process group was stopped
    assert results["fails"]["failures"] == ["a check did not pass"]
    assert results["fails"]["results"] == {"value": 2}  # a failed check does not stop the step
    assert "needs step fails" in results["needs_fails"]["why"]
    assert results["raises"]["results"] == {"partial": True}
    assert "RuntimeError: boom" in results["raises"]["error"]
    assert results["ok"]["results"] == {"value": 1}

    report = {"device": "CPU", "dry_run": True, "command": "c", "date": "d", "torch": "t",
              "cuda": None, "triton": None, "flash_attn": None, "wall_seconds": 1.0,
              "limit_seconds": 10, "steps": results}  # fmt: skip
    summary = gpu.render_summary(report, steps)
    rows = {line.split(" | ")[0][2:]: line for line in summary.splitlines() if line[:2] == "| "}
    assert "| timeout |" in rows["hangs"] and "| fail |" in rows["fails"]
    assert "fail: a check did not pass" in rows["fails"]
    assert "needs step fails, which did not pass" in rows["needs_fails"]
    assert "error: RuntimeError: boom" in rows["raises"]
    assert "Stopped at its limit of 2 s; partial results:" in summary
    assert "rendered ['child', 'started']" in summary  # partial results are rendered too


def test_time_limits_fit_eight_minutes_and_are_stated():
    total = sum(s.gpu_seconds for s in gpu.STEPS) + gpu.SETUP_SECONDS + gpu.OVERHEAD_SECONDS
    assert total <= 8 * 60
    doc = gpu.__doc__
    assert f"Total: {gpu.SETUP_SECONDS} + {total - gpu.SETUP_SECONDS - gpu.OVERHEAD_SECONDS}" in doc
    for step in gpu.STEPS:
        assert re.search(rf"^\s+{step.gpu_seconds} s\s+{step.name}\s", doc, re.M), step.name
    assert re.search(rf"^\s+{gpu.SETUP_SECONDS} s\s+\(setup\)", doc, re.M)
    makefile = (REPO / "Makefile").read_text()
    assert f"GPU_SETUP_SECONDS ?= {gpu.SETUP_SECONDS}\n" in makefile


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_target_passes_dry_run_only_when_asked():
    def flags(*variables: str) -> str:
        # The recipe calls $(MAKE) (setup), which `make -n` would run: ask make for the variable.
        out = subprocess.run(
            ["make", "-s", "--eval", "print-flags: ; @echo '[$(GPU_CHECK_FLAGS)]'", "print-flags",
             *variables],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return out.strip()

    assert flags("DRY_RUN=1") == "[--dry-run]"
    assert flags() == flags("DRY_RUN=0") == "[]"
    # Each of the target's three ways to run (venv, lent image + wheels, fresh setup) passes them.
    recipe = (REPO / "Makefile").read_text().split("\ngpu-check:")[1].split("\n\n")[0]
    runs = [line for line in recipe.splitlines() if "bench gpu" in line]
    assert len(runs) == 3 and all("$(GPU_CHECK_FLAGS)" in line for line in runs), runs


def test_gpu_run_without_a_gpu_is_one_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "gpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU visible to torch" in err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu(tmp_path, capsys):
    # ~50 s on 2 idle cores: the one place where the GPU check's steps run end to end.
    out = tmp_path / "out"
    assert main(["bench", "gpu", "--out", str(out), "--dry-run"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert {name: r["status"] for name, r in steps.items()} == dict.fromkeys(
        [s.name for s in gpu.STEPS], "ok"
    )
    skipped = {s["what"]: s["why"] for r in steps.values() for s in r["skipped"]}
    assert skipped["torch_varlen"] == "needs CUDA" and skipped["NVML (step 4)"] == "no GPU"
    assert "bf16" in skipped and "FSDP" in skipped  # never skipped silently

    cases = steps["kernel_accuracy"]["results"]["cases"]
    mixes = {c["mix"] for c in cases}
    assert len(cases) == 2 * len(mixes) and all(c["passed"] for c in cases)
    assert {"len1_and_empty", "cross_mixed"} <= mixes  # empty segments, cross offsets
    rel_cases = steps["kernel_accuracy"]["results"]["rel_pos_cases"]
    assert [(c["mix"], c["mask"]) for c in rel_cases] == [
        ("len1_and_empty", "full"),
        ("len1_and_empty", "causal"),
    ]
    assert all(c["passed"] and "dtable" in c["kernel"] for c in rel_cases)

    rows = steps["kernel_speed"]["results"]["rows"]
    assert {(r["shape"], r["backend"], r["mode"]) for r in rows} == {
        (shape, backend, mode)
        for shape in ("encoder self", "decoder causal", "cross")
        for backend in ("triton", "sdpa_padded")
        for mode in ("fwd", "fwd_bwd")
    }
    assert all(r["max_abs_diff"] < 1e-5 and r["ms"] > 0 for r in rows)  # fp32: same outputs

    training = steps["training"]["results"]
    configs = {(c["backend"], c["strategy"]): c for c in training["configs"]}
    assert set(configs) == set(CONFIGS)
    assert all(c["audio_seconds_per_second"] > 0 for c in configs.values())
    assert configs["triton", "packed"]["padding_frames"] == 0.0
    assert len(training["ratios"]) == 3

    buckets = steps["calibrate"]["results"]["buckets"]
    assert [b["batch_size"] for b in buckets] == [4, 4]  # tiny batches fit: the search hit its cap

    fsdp = steps["fsdp"]["results"]
    assert fsdp["exit_code"] == 0 and fsdp["steps"] == 3 and math.isfinite(fsdp["train/loss"])

    summary = (out / "summary.md").read_text()
    assert summary in capsys.readouterr().out  # printed, as written
    for step in gpu.STEPS:
        assert f"## {step.title}" in summary
    assert "skipped: NVML (step 4): no GPU" in summary
