"""A corpus with one cut of each bad-input class, beside good cuts at 16, 8, 22.05 and 48 kHz
(mono and stereo), through `data validate`, `train`, `eval`, `transcribe` and `bench padding`.

Every command either reports every bad cut with its reason, or exits non-zero with one clear
line; the good cuts at other rates are resampled, never lost; no WER over zero utterances; no
exit 0 when nothing was trained or evaluated. Commands run in this process (``speedasr.cli.main``):
an uncaught exception would fail the test with its traceback.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from lhotse import CutSet

from speedasr.cli import main
from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import OTHER_RATE_AUDIO, make_bad_input_cuts, tiny_texts

MAX_DURATION = 2.0  # below the over-long cut's 3 s
OTHER_RATES = {f"rate{rate}-{channels}ch" for rate, channels, _ in OTHER_RATE_AUDIO}


def run(*argv: str) -> tuple[int, str, str]:
    """``speedasr ARGV`` in this process, on one thread: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def train_args(root: Path, out_dir: Path, train: Path, dev: Path | None = None) -> list[str]:
    return [
        "train", f"--out_dir={out_dir}", f"--data.train_cuts={train}",
        f"--data.tokenizer={root / 'tok'}", f"--data.max_duration={MAX_DURATION}",
        "--data.num_workers=0", "--data.spec_augment.enabled=false",
        "--sampler.max_duration=8", "--sampler.num_buckets=1", "--sampler.num_token_buckets=1",
        "--model.d_model=32", "--model.encoder_layers=1", "--model.encoder_heads=2",
        "--model.decoder_layers=1", "--model.subsampling_channels=8",
        "--model.attention_backend=torch", "--optim.warmup_steps=1",
        "--trainer.max_steps=3", "--trainer.max_epochs=null", "--trainer.val_check_interval=3",
        "--trainer.check_val_every_n_epoch=null", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--monitors.padding=false", "--monitors.gpu=false",
        "--monitors.throughput=false",
        *([f"--data.dev_cuts={dev}"] if dev else []),
    ]  # fmt: skip


def rejects(path: Path) -> dict[str, str]:
    return {row["cut_id"]: row["reason"] for row in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(root, cuts path, expected reason per bad cut id, all-bad cuts path)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    cuts, expected = make_bad_input_cuts(root / "data")
    Tokenizer.train(tiny_texts(100, seed=5), root / "tok", vocab_size=80)
    # Unusable by every command: no good cut, and not the over-long one (eval takes any length).
    bad_only = [c for c in cuts if expected.get(c.id) not in (None, "duplicate_id", "too_long")]
    CutSet.from_cuts(bad_only).to_file(root / "bad_only.jsonl.gz")
    return root, root / "data/cuts.jsonl.gz", expected, root / "bad_only.jsonl.gz"


@pytest.fixture(scope="module")
def trained(corpus):
    """The corpus as training and dev set: (out dir, exit code, stdout, stderr)."""
    root, cuts, _, _ = corpus
    code, out, err = run(*train_args(root, root / "exp", cuts, dev=cuts))
    return root / "exp", code, out, err


def test_validate_names_every_bad_cut(corpus, tmp_path):
    root, cuts, expected, bad_only = corpus
    report = tmp_path / "rejects.jsonl"
    code, out, _ = run("data", "validate", "--cuts", str(cuts), "--out", str(report),
                       "--check-audio", "full", "--max-duration", str(MAX_DURATION))  # fmt: skip
    assert code == 0
    assert rejects(report) == expected
    assert "3 accepted cuts are not 16 kHz mono" in out
    code, out, _ = run("data", "validate", "--cuts", str(bad_only), "--out", str(report),
                       "--check-audio", "full", "--max-duration", str(MAX_DURATION))  # fmt: skip
    assert code == 1 and "accepted 0" in out


def test_train_reports_every_bad_cut_and_trains_on_the_other_rates(corpus, trained):
    _, _, expected, _ = corpus
    out_dir, code, out, err = trained
    assert code == 0, err[-2000:]
    # Training checks file headers: the NaN cut passes them and is skipped when loaded, with its
    # reason; every other bad cut is rejected up front. The dev set is loaded in full.
    header_checked = {k: v for k, v in expected.items() if v != "non_finite_samples"}
    assert rejects(out_dir / "rejects_train.jsonl") == header_checked
    assert rejects(out_dir / "skipped_train.jsonl") == {"nan": "non_finite_samples"}
    assert rejects(out_dir / "rejects_dev.jsonl") == expected
    assert "3 accepted cuts are not 16 kHz mono" in out
    metrics = next((out_dir / "logs").glob("version_*/metrics.csv")).read_text()
    assert "val/wer" in metrics.splitlines()[0]


def test_eval_lists_skipped_cuts_and_evaluates_the_other_rates(corpus, trained, tmp_path):
    root, cuts, expected, _ = corpus
    ckpt = trained[0] / "checkpoints/last.ckpt"
    summary = tmp_path / "summary.json"
    code, out, err = run("eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--quiet",
                         "--json", str(summary), "--out", str(tmp_path / "utts.jsonl"))  # fmt: skip
    assert code == 0, err[-2000:]
    skipped = {k: v for k, v in expected.items() if v != "too_long"}  # eval has no length limit
    data = json.loads(summary.read_text())
    assert {r["cut_id"]: r["reason"] for r in data["skipped"]} == skipped
    assert sum(data["skipped_counts"].values()) == len(skipped)
    assert data["utterances"] + len(skipped) == data["cuts"] == 16
    evaluated = {json.loads(line)["id"] for line in (tmp_path / "utts.jsonl").open()}
    assert OTHER_RATES <= evaluated
    assert f"skipped {len(skipped)} of 16 cuts" in out
    for cut_id, reason in skipped.items():
        assert f"  {cut_id}: {reason}: " in out


def test_eval_of_nothing_usable_is_an_error_not_a_wer(corpus, trained):
    _, _, _, bad_only = corpus
    ckpt = trained[0] / "checkpoints/last.ckpt"
    code, out, err = run("eval", "--ckpt", str(ckpt), "--cuts", str(bad_only), "--quiet")
    assert code == 2
    assert "WER" not in out
    assert len(err.strip().splitlines()) == 1 and "could be evaluated" in err
    assert "non_finite_samples 1" in err and "missing_audio 1" in err


def test_transcribe_names_every_input_it_could_not_transcribe(corpus, trained):
    root, cuts, expected, _ = corpus
    ckpt = trained[0] / "checkpoints/last.ckpt"
    code, out, err = run("transcribe", "--ckpt", str(ckpt), "--cuts", str(cuts), "--quiet")
    assert code == 1
    failed = {k: v for k, v in expected.items() if v not in ("too_long", "empty_text")}
    for cut_id, reason in failed.items():
        assert f"{cut_id}: not transcribed: {reason} (" in err
    assert f"transcribed {16 - len(failed)} of 16 inputs" in err
    assert OTHER_RATES <= {line.split("\t")[0] for line in out.splitlines()}

    audio = sorted((root / "data/audio").glob("rate[0-9]*0.*"))  # 8, 22.05 and 48 kHz files
    assert len(audio) == len(OTHER_RATE_AUDIO)
    code, out, err = run("transcribe", "--ckpt", str(ckpt), "--quiet", *map(str, audio))
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()] == list(map(str, audio))


def test_bench_padding_counts_every_cut_it_does_not_batch(corpus, tmp_path):
    _, cuts, expected, _ = corpus
    out = tmp_path / "bench.json"
    code, _, err = run("bench", "padding", "--cuts", str(cuts), "--budget-seconds", "4",
                       "--repeats", "1", "--check-audio", "full", "--json", str(out))  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    not_batched = {k for k, v in expected.items() if v != "too_long"}  # no length limit here
    for s in result["strategies"].values():
        assert s["cuts_seen"] + s["cuts_rejected"] == 16
        assert {i for ids in s["rejected"]["examples"].values() for i in ids} == not_batched


def test_training_on_nothing_usable_exits_non_zero_with_counts(corpus, tmp_path):
    root, cuts, _, bad_only = corpus
    # Every cut rejected before training (full audio check): one line with the counts.
    code, _, err = run(*train_args(root, tmp_path / "a", bad_only), "--data.check_audio=full")
    assert code == 2
    assert "no usable train cuts" in err and "non_finite_samples 1" in err
    assert "Traceback" not in err
    # Header check only: the NaN cut is accepted, then fails to load in every step.
    code, _, err = run(*train_args(root, tmp_path / "b", bad_only))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "no training step updated the model" in line and "non_finite_samples 1" in line
    # A dev set none of whose cuts loads: a clear error, not Lightning's missing val/wer.
    code, _, err = run(*train_args(root, tmp_path / "c", cuts, dev=bad_only))
    assert code == 2
    assert "no usable dev cuts" in err.strip().splitlines()[-1]
