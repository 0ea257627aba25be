"""`speedasr` command line: one table of commands, each implemented by a module.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int | None``, or
``main(argv) -> int | None`` when it parses its own arguments (``train``: typed configs).
Modules are imported only when their command runs, so ``speedasr --help`` is instant and one
command's heavy imports never slow another. Errors meant for the user (``UserError``) print as
one line and exit with code 2. Flag conventions (dotted config overrides, ``--x-y`` / ``--x_y``,
dtype names) live in ``speedasr.options`` and docs/cli.md.
"""

from __future__ import annotations

import importlib
import sys

from speedasr.errors import UserError
from speedasr.options import ArgumentParser

# (command words, implementing module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (
        ("data", "synth"),
        "speedasr.prep.corpus",
        "synthesize the embedded speech corpus (eSpeak NG)",
    ),
    (("data", "import"), "speedasr.prep.importers", "import NeMo JSON-lines or TSV manifests"),
    (("data", "validate"), "speedasr.data.manifests", "validate a cutset, write a rejects report"),
    (("data", "export-shar"), "speedasr.prep.shar_export", "export a cutset to lhotse Shar shards"),
    (("tokenizer", "train"), "speedasr.prep.tokenizer_cli", "train a sentencepiece tokenizer"),
    (("bins",), "speedasr.data.bins_cli", "estimate 2D (duration x tokens) bucket bins"),
    (("model", "info"), "speedasr.models.sizing", "parameters and FLOPs of a model preset/config"),
    (("plan",), "speedasr.models.planner", "compute-budget planner for model size and shape"),
    (("train",), "speedasr.train.run", "train a model from a YAML config"),
    (("calibrate",), "speedasr.train.calibrate", "calibrate per-bucket batch sizes"),
    (("transcribe",), "speedasr.inference", "transcribe audio files with a checkpoint"),
    (("eval",), "speedasr.evaluate", "WER and RTFx of a checkpoint on a cutset"),
    (("export",), "speedasr.export", "export a checkpoint for plain torch (torch.export)"),
    (("import-nemo",), "speedasr.nemo.import_nemo", "a NeMo Canary .nemo -> a speedasr checkpoint"),
    (("export-nemo",), "speedasr.nemo.export_nemo", "an imported checkpoint -> a NeMo .nemo"),
    (("bench", "padding"), "speedasr.bench.padding", "padding of batching strategies (metadata)"),
    (("bench", "throughput"), "speedasr.bench.throughput", "training throughput: packed vs padded"),
    (("bench", "rtfx"), "speedasr.bench.rtfx", "inference RTFx of encoder/decoder splits"),
    (
        ("bench", "convergence"),
        "speedasr.bench.convergence",
        "time to a target dev WER: packed vs padded batching",
    ),
    (
        ("bench", "alignment"),
        "speedasr.bench.alignment",
        "does the decoder learn to align (no audio)",
    ),
    (("bench", "kernels"), "speedasr.kernels.bench", "attention kernel TFLOP/s (GPU)"),
    (("bench", "gpu"), "speedasr.bench.gpu", "the prepared GPU check: kernels, training, NVML"),
    (("profile",), "speedasr.profile.report", "summary and plots from training logs"),
]


def _usage() -> str:
    lines = ["usage: speedasr COMMAND [ARGS...]", "", "commands:"]
    for words, _, help_ in COMMANDS:
        lines.append(f"  {' '.join(words):<22} {help_}")
    lines += [
        "",
        "Run `speedasr COMMAND --help` for a command's options. Config fields are set with",
        "--SECTION.KEY=VALUE (e.g. --model.d_model=256) wherever a command takes them; see",
        "docs/cli.md.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from speedasr import __version__

        print(__version__)
        return 0
    match = max(
        (c for c in COMMANDS if tuple(argv[: len(c[0])]) == c[0]),
        key=lambda c: len(c[0]),
        default=None,
    )
    if match is None:
        print(f"speedasr: error: unknown command '{' '.join(argv[:2])}'\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    words, module_name, help_ = match
    prog = "speedasr " + " ".join(words)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # a broken install: say which part is missing, never hide the command
        print(
            f"{prog}: error: cannot import {module_name} ({type(e).__name__}: {e}); "
            "this speedasr installation is incomplete: reinstall it",
            file=sys.stderr,
        )
        return 1
    rest = argv[len(words) :]
    try:
        if hasattr(module, "main"):
            return int(module.main(rest) or 0)
        parser = ArgumentParser(prog=prog, description=help_)
        module.add_arguments(parser)
        return int(module.run(parser.parse_args(rest)) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
