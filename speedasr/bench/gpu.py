"""`speedasr bench gpu`: the prepared GPU check, one run of at most 8 minutes on one H100.

    make gpu-check              # speedasr bench gpu --out exp/gpu-check
    make gpu-check DRY_RUN=1    # speedasr bench gpu --out exp/gpu-check --dry-run (CPU; CI runs it)

GPUs are lent to this project only now and then, for minutes; this command measures everything
that needs one, in one go (docs/benchmarks.md, "GPU check"). Steps and their time limits (seconds
on one H100; a dry run gets its own, on CPU):

    limit  step             what
    100 s  (setup)          ``make gpu-check`` only: uses ``.venv`` if it imports speedasr and
                            torch, else runs ``make setup`` (needs PyPI; ``torch==2.13.0`` from
                            PyPI is the CUDA build)
     20 s  data             eSpeak corpus (0.6 h train) and a tokenizer, for training and fsdp
     90 s  kernel_accuracy  Triton kernels vs the fp32 reference in bf16 and fp16, forward and
                            backward, curated length mixes (empty segments, cross-attention with
                            different q/k offsets, causal); pass: <= 2x the error of plain PyTorch
                            attention in the same dtype
     50 s  kernel_speed     fwd and fwd+bwd ms and TFLOP/s at Canary-like packed shapes: Triton,
                            padded SDPA, torch ``varlen_attn``, ``flash_attn_varlen_func``
    110 s  training         packed vs padded-random vs padded-2D training throughput of a
                            canary-180m-flash-sized model in bf16, torch and Triton attention:
                            audio s/s, peak memory, MFU; NVML utilization and memory meanwhile
     40 s  calibrate        ``speedasr calibrate``'s search for 2 buckets (bf16-mixed)
     60 s  fsdp             ``speedasr train`` with ``trainer.strategy=fsdp`` on 1 GPU, 5 steps,
                            GPUUtilizationMonitor and SpeechThroughputMonitor on

Total: 100 + 370 + ~10 s (start-up, summary) = 480 s. With a ready ``.venv`` setup takes ~0 s.

Every step runs in its own process (``speedasr.bench.gpu_step``) under its own limit: a hard limit
needs a process (a running CUDA kernel cannot be interrupted from Python); a CUDA error (illegal
address) poisons the process's context and must not take the next step with it; calibration caps
the allocator process-wide; and ``TRITON_INTERPRET`` must be set before triton is first imported
(dry run) and unset on the GPU. A step that fails, errs or runs out of time is reported with what
it measured until then, and the next step runs; steps that need the data step are skipped, with
the reason, if it did not pass. The exit code is 0 only if every step passed.

``--dry-run`` runs the same steps on CPU with tiny shapes: the kernels under the Triton interpreter
in fp32/fp16 (its bf16 ``tl.dot`` is wrong), training in fp16 autocast, calibration against a CPU
memory budget, and the FSDP run as the same training run with ``strategy=ddp`` on CPU. What needs a
GPU (NVML, bf16 kernels, FSDP itself, torch's CUDA varlen op) is listed as skipped in the summary.

Output in ``--out DIR``: ``gpu_check.json`` (everything), ``summary.md`` (printed at the end), and
``steps/<step>.json`` / ``steps/<step>.log`` (each step's result and output).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from speedasr.bench.gpu_step import load_function
from speedasr.errors import UserError

SETUP_SECONDS = 100
"""Time limit of ``make gpu-check``'s setup (the Makefile's ``GPU_SETUP_SECONDS``)."""
OVERHEAD_SECONDS = 10
"""Process start-up and the summary, outside the steps' limits."""


@dataclass(frozen=True)
class Step:
    """One step: a function run in its own process, and the function that renders its result."""

    name: str
    title: str
    run: str  # "module:function" taking a StepContext
    render: str  # "module:function" from the step's JSON result to markdown lines
    gpu_seconds: float  # time limit on the GPU
    dry_seconds: float  # time limit of the dry run (2 CPU cores)
    needs: tuple[str, ...] = ()  # steps that must pass first


_K, _T = "speedasr.bench.gpu_kernels", "speedasr.bench.gpu_training"
# fmt: off
STEPS: tuple[Step, ...] = (
    Step("data", "Data", f"{_T}:make_data", f"{_T}:render_data", 20, 30),
    Step("kernel_accuracy", "1. Kernel accuracy", f"{_K}:accuracy", f"{_K}:render_accuracy",
         90, 45),
    Step("kernel_speed", "2. Kernel speed", f"{_K}:speed", f"{_K}:render_speed", 50, 30),
    Step("training", "3-4. Training throughput and NVML", f"{_T}:training",
         f"{_T}:render_training", 110, 45, needs=("data",)),
    Step("calibrate", "5a. Calibrate", f"{_T}:calibrate", f"{_T}:render_calibrate", 40, 35),
    Step("fsdp", "5b. FSDP", f"{_T}:fsdp", f"{_T}:render_fsdp", 60, 45, needs=("data",)),
)
# fmt: on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and summary.md")
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on CPU with tiny shapes (CI)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=[s.name for s in STEPS], metavar="STEP",
        help="run only these steps (and the steps they need), e.g. to rerun a failed one",
    )  # fmt: skip
    parser.add_argument(
        "--work", default=None,
        help="directory for the generated corpus, kept afterwards (default: a temporary one)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    environment = _environment(args.dry_run)
    out = Path(args.out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="speedasr-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    steps = _selected(args.only)
    limits = [s.dry_seconds if args.dry_run else s.gpu_seconds for s in steps]
    print(
        f"bench gpu: {len(steps)} steps on {environment['device']}"
        f"{' (dry run)' if args.dry_run else ''}, limit {sum(limits):.0f} s in all; "
        f"logs in {out / 'steps'}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        results = run_steps(steps, out / "steps", work, args.dry_run)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        **environment,
        "command": _command(args),
        "dry_run": args.dry_run,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "limit_seconds": sum(limits),
        "steps": results,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = render_summary(report, steps)
    (out / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def _command(args: argparse.Namespace) -> str:
    words = ["speedasr bench gpu --out", str(args.out)] + (["--dry-run"] if args.dry_run else [])
    words += ["--only", *args.only] if args.only else []
    return " ".join(words + (["--work", args.work] if args.work else []))


def _selected(only: list[str] | None) -> list[Step]:
    if not only:
        return list(STEPS)
    wanted = set(only)
    for step in STEPS:
        if step.name in wanted:
            wanted.update(step.needs)
    return [s for s in STEPS if s.name in wanted]


def _environment(dry_run: bool) -> dict:
    """Versions and the device; refuses a GPU run without a CUDA device, naming the torch build."""
    import torch

    if not dry_run and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(
            f"no CUDA GPU visible to torch {torch.__version__} ({build}); on a GPU machine install "
            "the CUDA build of torch into .venv (docs/benchmarks.md, 'GPU check'), or use --dry-run"
        )
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if not dry_run else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn"),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- running the steps -------------------------------------------------------------------------


def run_steps(steps: list[Step], step_dir: Path, work: Path, dry_run: bool) -> dict[str, dict]:
    """Each step in its own process under its time limit; returns ``{name: result}``.

    A result is the step's own JSON (``results``, ``skipped``, ``failures``, maybe ``error``) plus
    ``status`` (ok, fail, error, timeout or skipped), ``seconds`` and ``limit_seconds``.
    """
    results: dict[str, dict] = {}
    for i, step in enumerate(steps, 1):
        limit = step.dry_seconds if dry_run else step.gpu_seconds
        missing = [n for n in step.needs if results.get(n, {}).get("status") != "ok"]
        if missing:
            why = f"needs step {', '.join(missing)}, which did not pass"
            result = {"status": "skipped", "why": why, "seconds": 0.0, "limit_seconds": limit}
        else:
            print(f"[{i}/{len(steps)}] {step.name} (limit {limit:.0f} s) ...", flush=True)
            result = run_step(step, step_dir, work, dry_run, limit)
        results[step.name] = result
        print(f"[{i}/{len(steps)}] {step.name}: {_status_text(result)}", flush=True)
    return results


def run_step(step: Step, step_dir: Path, work: Path, dry_run: bool, limit: float) -> dict:
    result_path, log_path = step_dir / f"{step.name}.json", step_dir / f"{step.name}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "speedasr.bench.gpu_step", step.run, "--result", str(result_path),
           "--work", str(work), *(["--dry-run"] if dry_run else [])]  # fmt: skip
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    with open(log_path, "w") as log:
        # Own session: at the limit the step's whole process tree (data workers, Lightning's
        # children) is stopped, and nothing else.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=_step_env(dry_run),
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            _stop(proc)
            timed_out = True
    seconds = round(time.perf_counter() - start, 1)
    cpu_seconds = round(_children_cpu_seconds() - cpu_start, 1)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"results": {}, "skipped": [], "failures": []}
    if timed_out:
        status = "timeout"
    elif proc.returncode != 0:
        status = "error"
        result.setdefault("error", _tail(log_path) or f"exit code {proc.returncode}")
    else:
        status = "fail" if result["failures"] else "ok"
    return {
        "status": status, "seconds": seconds, "cpu_seconds": cpu_seconds, "limit_seconds": limit,
        **result,
    }  # fmt: skip


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (on a shared machine, a step's CPU
    time says more about its cost than its wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _step_env(dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when triton decorates the kernels, at their import
    else:
        env.pop("TRITON_INTERPRET", None)  # a leftover would run the "GPU" kernels in numpy
    return env


def _stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 6) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def _status_text(result: dict) -> str:
    text = f"{result['status']} ({result['seconds']:.1f} s of {result['limit_seconds']:.0f} s"
    text += f", CPU {result['cpu_seconds']:.1f} s)" if "cpu_seconds" in result else ")"
    if result.get("why"):
        text += f": {result['why']}"
    if result.get("failures"):
        text += f": {len(result['failures'])} failed check(s), first: {result['failures'][0]}"
    if result["status"] == "error":
        text += ": " + result.get("error", "").splitlines()[-1]
    return text


# --- summary -------------------------------------------------------------------------------------


def render_summary(report: dict, steps: list[Step]) -> str:
    """The markdown summary: environment, one status row per step, then each step's tables."""
    dry = " - dry run (tiny shapes; timings mean nothing)" if report["dry_run"] else ""
    lines = [
        f"# GPU check: {report['device']}{dry}",
        "",
        f"`{report['command']}` on {report['date']}: torch {report['torch']} "
        f"(CUDA {report['cuda'] or '-'}), triton {report['triton'] or '-'}, flash-attn "
        f"{report['flash_attn'] or 'not installed'}; {report['wall_seconds']:.0f} s wall "
        f"(step limits {report['limit_seconds']:.0f} s).",
        "",
        "| step | status | seconds (limit) | CPU s | notes |",
        "|---|---|---:|---:|---|",
    ]
    for step in steps:
        r = report["steps"][step.name]
        notes = [r.get("why", "")] + [f"fail: {f}" for f in r.get("failures", [])]
        notes += [f"skipped: {s['what']}: {s['why']}" for s in r.get("skipped", [])]
        if r["status"] == "error":
            notes.append("error: " + r.get("error", "").splitlines()[-1])
        note = "; ".join(n for n in notes if n).replace("|", "/")
        cpu = f"{r['cpu_seconds']:.1f}" if "cpu_seconds" in r else "-"
        lines.append(
            f"| {step.name} | {r['status']} | {r['seconds']:.1f} ({r['limit_seconds']:.0f}) "
            f"| {cpu} | {note} |"
        )
    for step in steps:
        r = report["steps"][step.name]
        lines += ["", f"## {step.title}", ""]
        if r["status"] == "skipped":
            lines.append(f"Skipped: {r['why']}.")
            continue
        if r["status"] == "error":
            lines += ["Error:", "```", r.get("error", ""), "```", ""]
        if r["status"] == "timeout":
            lines += [f"Stopped at its limit of {r['limit_seconds']:.0f} s; partial results:", ""]
        lines += load_function(step.render)(r["results"]) or ["(no results)"]
    return "\n".join(lines) + "\n"
