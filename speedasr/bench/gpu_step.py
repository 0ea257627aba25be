"""One step of the GPU check (``speedasr bench gpu``), run in its own process.

``python -m speedasr.bench.gpu_step MODULE:FUNCTION --result FILE --work DIR [--dry-run]`` imports
the step function and calls it with a ``StepContext``. The step records what it measured through the
context, which rewrites ``--result`` (JSON) after every record: when the parent kills a step at its
time limit, everything measured so far is still there. An exception is written into the result
(``error``, the traceback's last lines) and the process exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any


class StepContext:
    """What a step function gets: where to write, whether this is a dry run, and the recorders.

    Attributes:
        work: directory shared by the steps of one check (the data step writes the corpus there).
        dry_run: CPU with tiny shapes (the kernels run in the Triton interpreter).
        result: the step's JSON result, ``{"results": {...}, "skipped": [...], "failures": [...]}``.
    """

    def __init__(self, result_path: Path, work: Path, dry_run: bool) -> None:
        self.result_path = result_path
        self.work = work
        self.dry_run = dry_run
        self.result: dict[str, Any] = {"results": {}, "skipped": [], "failures": []}
        self._save()

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry_run else "cuda")

    def record(self, **fields: Any) -> None:
        """Set result fields (JSON values) and save."""
        self.result["results"].update(fields)
        self._save()

    def append(self, key: str, row: dict[str, Any]) -> None:
        """Append ``row`` to the list ``results[key]`` and save."""
        self.result["results"].setdefault(key, []).append(row)
        self._save()

    def skip(self, what: str, why: str) -> None:
        """Record that a part of the step did not run, and why (shown in the summary)."""
        self.result["skipped"].append({"what": what, "why": why})
        self._save()

    def fail(self, why: str) -> None:
        """Record a failed check; the step goes on, and its status becomes ``fail``."""
        self.result["failures"].append(why)
        self._save()

    def _save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, self.result_path)  # a reader never sees half a file


def load_function(target: str):
    """``"package.module:function"`` -> the function."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedasr.bench.gpu_step")
    parser.add_argument("target", help="MODULE:FUNCTION taking a StepContext")
    parser.add_argument("--result", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    ctx = StepContext(args.result, args.work, args.dry_run)
    try:
        load_function(args.target)(ctx)
    except BaseException as e:  # noqa: BLE001 - everything is reported; the parent goes on
        ctx.result["error"] = "".join(traceback.format_exception(e)[-6:]).strip()
        ctx._save()
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
