"""NeMo itself restores what export-nemo writes (marked ``nemo``: needs a Python with
nemo-toolkit, given as ``SPEEDASR_NEMO_PYTHON``, e.g. the venv of tools/nemo_fixture/README.md):

    SPEEDASR_NEMO_PYTHON=/work/nemo-venv/bin/python .venv/bin/python -m pytest -m nemo tests/nemo

``tools/nemo_fixture/check_export.py`` runs NeMo's ``restore_from`` on the exported file and
NeMo's forward and greedy decoding on the fixture's audio, and requires the fixture's outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedasr.nemo.export_nemo import export_nemo
from speedasr.nemo.import_nemo import import_nemo

REPO = Path(__file__).parents[2]
NEMO_PYTHON = os.environ.get("SPEEDASR_NEMO_PYTHON")


@pytest.mark.nemo
@pytest.mark.skipif(not NEMO_PYTHON, reason="SPEEDASR_NEMO_PYTHON (a Python with NeMo) not set")
def test_nemo_restores_the_export_and_gives_the_fixture_outputs(tmp_path):
    ckpt, *_ = import_nemo(REPO / "tests/fixtures/nemo/canary_tiny.nemo", tmp_path / "imported")
    exported = export_nemo(ckpt, tmp_path / "exported.nemo").path
    result = subprocess.run(
        [NEMO_PYTHON, str(REPO / "tools/nemo_fixture/check_export.py"), str(exported)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    sys.stdout.write(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ids and texts equal" in result.stdout
