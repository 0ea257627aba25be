"""recipes/tiny/run.sh refuses a missing config before it synthesizes anything."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_sh_missing_config_fails_before_any_work(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["DATA"] = str(tmp_path / "corpus")
    proc = subprocess.run(
        ["bash", str(ROOT / "recipes/tiny/run.sh"), str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"run.sh: config {tmp_path / 'missing.yaml'}: no such file"
    assert not (tmp_path / "corpus").exists()
