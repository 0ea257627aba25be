"""The Python API (``speedasr.load`` -> ``Transcriber.transcribe``) against ``speedasr transcribe``.

The checkpoint is a tiny untrained model: its transcripts are noise, but the API and the command
must print the same noise for the same audio. CTC transcripts (one greedy choice per 80 ms frame)
follow the audio closely, so they are the ones that catch a wrong resampling or a swapped input.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speedasr
from speedasr.cli import main
from speedasr.errors import UserError
from speedasr.testing import make_tiny_cuts, write_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, cuts of 3 tone utterances at 16 kHz, their audio paths, loaded model)."""
    root = tmp_path_factory.mktemp("api")
    ckpt = write_untrained_checkpoint(root, seed=0)
    cuts = make_tiny_cuts(root / "data", 3, seed=7)
    paths = [c.recording.sources[0].source for c in cuts]
    return ckpt, cuts, paths, speedasr.load(ckpt)


def cli_texts(capsys, ckpt, paths, *flags) -> list[str]:
    capsys.readouterr()
    assert main(["transcribe", "--ckpt", str(ckpt), "--quiet", *flags, *paths]) == 0
    printed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    return [printed[p] for p in paths]


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        ({}, []),
        ({"beam_size": 3, "ctc_weight": 0.3}, ["--beam-size", "3", "--ctc-weight", "0.3"]),
        ({"decoder": "ctc"}, ["--decoder", "ctc"]),
    ],
    ids=["greedy", "joint-beam", "ctc"],
)
def test_transcribe_equals_the_command(setup, capsys, kwargs, flags):
    ckpt, _, paths, model = setup
    texts = model.transcribe(paths, **kwargs)
    assert texts == cli_texts(capsys, ckpt, paths, *flags)
    assert all(texts)


def test_cuts_paths_and_batching_agree(setup):
    _, cuts, paths, model = setup
    expected = model.transcribe(paths, decoder="ctc")
    assert model.transcribe(cuts, decoder="ctc") == expected  # a CutSet
    assert model.transcribe(list(cuts)[::-1], decoder="ctc") == expected[::-1]  # input order
    assert model.transcribe(paths, decoder="ctc", batch_size=1) == expected
    assert model.transcribe(paths[1], decoder="ctc") == [expected[1]]  # one input: a list of one
    assert len(set(expected)) == 3  # the check above can tell the utterances apart
    assert model.transcribe([]) == []


def test_arrays_at_8khz_transcribe_as_their_file(setup, tmp_path):
    _, _, paths, model = setup
    audio_16k, rate = sf.read(paths[0], dtype="float32")
    assert rate == 16000
    audio_8k = audio_16k[::2].copy()  # any 8 kHz signal will do: it is compared with its file
    wav = tmp_path / "a8k.wav"
    sf.write(wav, audio_8k, 8000, subtype="FLOAT")
    for decoder in ("ctc", "attention"):
        from_file = model.transcribe(str(wav), decoder=decoder)
        from_numpy = model.transcribe(audio_8k, sample_rate=8000, decoder=decoder)
        from_torch = model.transcribe(torch.from_numpy(audio_8k), sample_rate=8000, decoder=decoder)
        assert from_file == from_numpy == from_torch
    # the rate matters (the test can fail): the same samples read as 16 kHz are other audio
    as_16k = model.transcribe(audio_8k, sample_rate=16000, decoder="ctc")
    assert as_16k != model.transcribe(str(wav), decoder="ctc")
    # a mixed list keeps its order: an array, a path, a cut
    _, cuts, _, _ = setup
    mixed = model.transcribe([audio_8k, paths[2], cuts[1]], sample_rate=8000, decoder="ctc")
    singles = model.transcribe([str(wav), paths[2], paths[1]], decoder="ctc")
    assert mixed == singles


def test_the_same_file_twice_is_two_inputs(setup):
    _, _, paths, model = setup
    once = model.transcribe(paths[0], decoder="ctc")
    assert model.transcribe([paths[0], paths[0]], decoder="ctc") == once * 2


def test_bfloat16(setup):
    ckpt, _, paths, _ = setup
    model = speedasr.load(ckpt, dtype=torch.bfloat16)
    assert model.model.weight_dtype == torch.bfloat16
    assert len(model.transcribe(paths[:2])) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, p: m.transcribe([p, "missing.wav"]), "audio file 'missing.wav' does not exist"),
        (lambda m, p: m.transcribe(np.zeros(800, np.float32)), "array 0: give sample_rate="),
        (lambda m, p: m.transcribe([p, np.zeros((2, 80), np.float32)], sample_rate=8000),
         "array 1: expected 1-D samples"),
        (lambda m, p: m.transcribe(np.zeros(800, np.int16), sample_rate=8000),
         "expected float samples"),
        (lambda m, p: m.transcribe(np.full(800, np.nan, np.float32), sample_rate=8000),
         "array 0: has NaN"),
        (lambda m, p: m.transcribe(np.zeros(800, np.float32), sample_rate=8000.5),
         "sample_rate must be a positive int"),
        (lambda m, p: m.transcribe(p, language="xx"), "language 'xx' is not in the tokenizer"),
        (lambda m, p: m.transcribe(p, beam_size=0), "beam_size must be >= 1"),
        (lambda m, p: m.transcribe(p, decoder="ctc", beam_size=2), "CTC decoding is greedy"),
        (lambda m, p: m.transcribe(p, batch_duration=0), "batch_duration must be > 0"),
        (lambda m, p: m.transcribe([p, 3]), "input 1: expected an audio path"),
        (lambda m, p: m.transcribe({"a": p}), "inputs must be a path, cut, array or a list"),
    ],
)  # fmt: skip
def test_bad_input_is_a_one_line_error(setup, call, message):
    _, _, paths, model = setup
    with pytest.raises(UserError) as e:
        call(model, paths[0])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_file_is_named(setup, tmp_path):
    _, _, paths, model = setup
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="broken.flac"):
        model.transcribe([paths[0], str(bad)])


def test_ctc_options_need_a_ctc_head(tmp_path):
    model = speedasr.load(write_untrained_checkpoint(tmp_path, ctc_weight=0.0))
    for kwargs in ({"decoder": "ctc"}, {"ctc_weight": 0.3}):
        with pytest.raises(UserError, match="needs a CTC head"):
            model.transcribe("any.wav", **kwargs)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="'missing.ckpt' does not exist"):
        speedasr.load("missing.ckpt")
    with pytest.raises(UserError, match="dtype 'fp8' is not one of"):
        speedasr.load("missing.ckpt", dtype="fp8")


def test_import_speedasr_does_not_import_torch():
    code = "import sys, speedasr; print(sorted(m for m in ('torch', 'lhotse') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def readme_example() -> str:
    """The Python block of the README's "From Python" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(setup, tmp_path):
    # The example's relative paths are those `make demo` leaves; here they hold the test's files.
    ckpt, _, paths, model = setup
    code = readme_example()
    assert len(code.strip().splitlines()) <= 5
    ckpt_path, audio_path = re.findall(r'"([^"]+\.(?:ckpt|flac))"', code)
    for src, rel in ((ckpt, ckpt_path), (paths[0], audio_path)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, tmp_path / rel)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    kwargs = dict(re.findall(r"(\w+)=([\d.]+)", code.split("transcribe(", 1)[1]))
    expected = model.transcribe(paths[0], **{k: type_of(v) for k, v in kwargs.items()})
    assert proc.stdout.strip() == expected[0]


def type_of(value: str):
    return float(value) if "." in value else int(value)


@pytest.fixture
def triton_checkpoint(tmp_path):
    """The ``setup`` checkpoint's model (seed 0) saved by a run with attention_backend triton."""
    return write_untrained_checkpoint(tmp_path, seed=0, attention_backend="triton")


def block_triton(monkeypatch) -> None:
    """``import triton`` fails, as in tests/test_extras.py."""
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in ("speedasr.kernels.flash_varlen", "speedasr.kernels.flash_varlen_kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_triton_checkpoint_without_triton_is_refused_before_the_audio(
    setup, triton_checkpoint, monkeypatch, capsys
):
    _, _, paths, model = setup
    block_triton(monkeypatch)
    capsys.readouterr()
    assert main(["transcribe", "--ckpt", str(triton_checkpoint), "--quiet", *paths]) == 2
    assert capsys.readouterr().err == (
        f"speedasr transcribe: error: checkpoint '{triton_checkpoint}': "
        "model.attention_backend=triton needs triton, which the core install leaves out (use "
        "--attention-backend auto or torch without it): pip install 'speedasr[gpu]'\n"
    )
    says = r"^checkpoint .*: model.attention_backend=triton needs triton.*'auto' or 'torch'.*\[gpu"
    with pytest.raises(UserError, match=says):
        speedasr.load(triton_checkpoint)
    # The backend chosen at run time: the same weights give the torch checkpoint's texts.
    expected = model.transcribe(paths, decoder="ctc") + model.transcribe(paths)
    torch_run = speedasr.load(triton_checkpoint, attention_backend="torch")
    assert torch_run.transcribe(paths, decoder="ctc") + torch_run.transcribe(paths) == expected
    assert (
        cli_texts(capsys, triton_checkpoint, paths, "--attention-backend", "torch")
        == (expected[len(paths) :])
    )


def test_a_triton_checkpoint_off_cuda_is_refused_before_the_cuts(
    setup, triton_checkpoint, monkeypatch, capsys
):
    from speedasr.kernels import flash_varlen

    # The tests run the kernels interpreted, which takes CPU tensors; a user's Triton does not.
    monkeypatch.setattr(flash_varlen, "_INTERPRET", False)
    capsys.readouterr()
    code = main(["eval", "--ckpt", str(triton_checkpoint), "--cuts", "missing.jsonl.gz"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"speedasr eval: error: checkpoint '{triton_checkpoint}': model.attention_backend=triton "
        "runs only on CUDA GPUs and --device is cpu: use --attention-backend auto or torch\n"
    )
    ckpt = setup[0]  # a torch checkpoint asked to run triton on the CPU
    code = main(["transcribe", "--ckpt", str(ckpt), "--attention-backend", "triton", "x.wav"])
    assert code == 2
    assert capsys.readouterr().err == (
        "speedasr transcribe: error: --attention-backend triton runs only on CUDA GPUs and "
        "--device is cpu: use --attention-backend auto or torch\n"
    )
    says = r"^attention_backend='triton' runs only on CUDA GPUs and device is cpu: use attention_"
    with pytest.raises(UserError, match=says + r"backend='auto' or 'torch'$"):
        speedasr.load(ckpt, attention_backend="triton")
    with pytest.raises(UserError, match="attention_backend 'cuda' is not one of auto, torch"):
        speedasr.load(ckpt, attention_backend="cuda")
