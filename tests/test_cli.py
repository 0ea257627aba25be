"""Every command answers --help, and bad input gets one clear line and a non-zero exit."""

import subprocess
import sys

import pytest

from speedasr.cli import COMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speedasr.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words, _, _ in COMMANDS:
        assert " ".join(words) in out


@pytest.mark.parametrize("words", [c[0] for c in COMMANDS], ids=lambda w: " ".join(w))
def test_every_command_has_help(words):
    proc = run_cli(*words, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_a_command_whose_module_is_missing_is_listed_and_fails_loudly(monkeypatch, capsys):
    # A wheel without a subpackage (speedasr.decoding once) must not make commands vanish.
    monkeypatch.setattr("speedasr.cli.COMMANDS", [(("ghost",), "speedasr.no_such_module", "x")])
    assert main(["--help"]) == 0
    assert "ghost" in capsys.readouterr().out
    assert main(["ghost"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speedasr.no_such_module" in err and "reinstall" in err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_train_missing_config(tmp_path):
    one_line_error(run_cli("train", "--config", str(tmp_path / "nope.yaml")), "does not exist")


def test_train_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  d_modell: 3\n")
    one_line_error(run_cli("train", "--config", str(cfg)), "d_modell")


def test_eval_missing_cuts_and_bad_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_text("this is not a checkpoint")
    one_line_error(run_cli("eval", "--ckpt", str(bad), "--cuts", "c.jsonl.gz"), "x.ckpt")
    one_line_error(
        run_cli("transcribe", "--ckpt", str(tmp_path / "none.ckpt"), "a.wav"), "none.ckpt"
    )
