import json

import pytest
import torch

from speedasr.bench.convergence import RunResult, state_checksum
from speedasr.bench.convergence_report import markdown_table, summarize, time_to_target
from speedasr.cli import main
from speedasr.data.tokenizer import Tokenizer
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.testing import make_tiny_cuts, tiny_texts

CONFIG = """\
data: {num_workers: 0}
sampler: {mode: packed, max_duration: 6.0, num_buckets: 2, num_token_buckets: 1}
model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,
        subsampling_channels: 8, attention_backend: torch}
optim: {lr: 0.003, warmup_steps: 2}
trainer: {max_epochs: null, max_steps: 4, val_check_interval: 2, check_val_every_n_epoch: null}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    make_tiny_cuts(root / "train", n=16, seed=0, speech=True)
    make_tiny_cuts(root / "dev", n=4, seed=1, speech=True)
    Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=100)
    (root / "tiny.yaml").write_text(CONFIG)
    return root


def bench_args(root, out, *extra: str) -> list[str]:
    return ["bench", "convergence", "--config", str(root / "tiny.yaml"),
            "--train-cuts", str(root / "train/cuts.jsonl.gz"),
            "--dev-cuts", str(root / "dev/cuts.jsonl.gz"), "--tokenizer", str(root / "tok"),
            "--out", str(out), *extra]  # fmt: skip


def test_end_to_end_same_weights_real_padding(corpus, tmp_path, capsys):
    assert main(bench_args(corpus, tmp_path, "--target-wer", "0.99")) == 0
    report = json.loads((tmp_path / "convergence.json").read_text())
    runs = {r["strategy"]: r for r in report["runs"]}
    assert list(runs) == ["random", "bucket2d", "packed"]  # the default order

    # Identical initial weights: the model the bench builds for seed 0, built here independently.
    model_cfg = ModelConfig(**report["settings"]["config"]["model"])
    torch.manual_seed(0)
    expected = state_checksum(AEDModel(model_cfg))
    assert {r["initial_checksum"] for r in runs.values()} == {expected}

    # Padded strategies computed padding, packed none; 2D and packed stay within the budget
    # (lhotse's DynamicCutSampler may overshoot by its last cut, see docs/benchmarks.md).
    for name in ("random", "bucket2d"):
        assert runs[name]["padding"]["padding_frames"] > 0
        assert runs[name]["padding"]["padding_tokens"] > 0
    assert runs["packed"]["padding"]["padding_frames"] == 0
    assert runs["packed"]["padding"]["padding_tokens"] == 0
    assert runs["bucket2d"]["max_batch_seconds"] <= 6.0 + 1e-6
    assert runs["packed"]["max_batch_seconds"] <= 6.0 + 1e-6

    for r in runs.values():
        assert r["steps"] == 4
        assert [p["step"] for p in r["points"]] == [2, 4]
        first, last = r["points"]
        assert 0 < first["audio_hours"] < last["audio_hours"] <= r["audio_hours"] + 1e-12
        assert 0 < first["train_seconds"] < last["train_seconds"] <= r["train_seconds"] + 1e-6
        assert last["train_seconds"] <= last["elapsed_seconds"]  # validation is excluded
        assert all(0 <= p["wer"] and 0 <= p["ctc_wer"] for p in r["points"])
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_threads"] >= 1

    table = (tmp_path / "convergence.md").read_text()
    assert len(table.splitlines()) == 5  # header, separator, three strategies
    assert "packed (speedasr)" in table and "0.0% / 0.0%" in table
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "random   step     2/4" in out and "done in" in out


def test_time_to_target_is_the_first_validation_at_or_below_it():
    points = [
        {"step": s, "train_seconds": 10.0 * s, "elapsed_seconds": 11.0 * s,
         "audio_hours": 0.1 * s, "wer": 1.0, "ctc_wer": c}
        for s, c in ((1, 0.9), (2, 0.5), (3, 0.7), (4, 0.4))
    ]  # fmt: skip
    assert time_to_target(points, "ctc_wer", 0.5) == {
        "train_seconds": 20.0, "elapsed_seconds": 22.0, "step": 2, "audio_hours": 0.2
    }  # fmt: skip
    assert time_to_target(points, "ctc_wer", 0.3) is None
    assert time_to_target(points, "wer", 0.99) is None


def _run(strategy, seconds_to_target, total_seconds=100.0, repeat=0):
    """A finished run of ``total_seconds`` that reached the target after ``seconds_to_target``
    (None: never)."""
    r = RunResult(strategy, repeat, repeat, steps=10, train_seconds=total_seconds)
    r.points = [{"step": 10, "train_seconds": total_seconds, "elapsed_seconds": total_seconds,
                 "audio_hours": 1.0, "wer": 0.5, "ctc_wer": 0.2}]  # fmt: skip
    r.padding = {"padding_frames": 0.0 if strategy == "packed" else 0.3, "padding_tokens": 0.1}
    if seconds_to_target is not None:
        r.time_to_target = {"train_seconds": seconds_to_target, "elapsed_seconds": 0.0,
                            "step": 5, "audio_hours": 0.5}  # fmt: skip
    return r


def test_ratios_median_of_repeats_and_bound_when_missed():
    strategies = ["random", "bucket2d", "packed"]
    runs = [
        _run(strategy, to_target, total, repeat)
        for repeat, (random_s, bucket2d_total, packed_s) in enumerate(
            [(40.0, 50.0, 10.0), (60.0, 80.0, 20.0), (50.0, 40.0, 30.0)]
        )
        for strategy, to_target, total in (
            ("random", random_s, 100.0), ("bucket2d", None, bucket2d_total),
            ("packed", packed_s, 100.0),
        )
    ]  # fmt: skip
    summary = summarize(runs, strategies)
    # per repeat: 10/40, 20/60, 30/50 -> median 1/3
    assert summary["ratios"]["packed_over_random"] == pytest.approx(1 / 3)
    assert summary["ratios"]["packed_over_random_at_most"] is None
    # bucket2d never reached the target: bounded by packed's time / its whole run, per repeat
    # 10/50, 20/80, 30/40 -> median 1/4
    assert summary["ratios"]["packed_over_bucket2d"] is None
    assert summary["ratios"]["packed_over_bucket2d_at_most"] == pytest.approx(0.25)
    assert summary["strategies"]["packed"]["time_to_target_seconds"] == 20.0
    assert summary["strategies"]["bucket2d"]["time_to_target_seconds"] is None
    table = markdown_table(summary, "ctc", 0.3)
    assert "≤ 30%" in table and "| 0.33 | ≤ 0.25 |" in table and "not reached" in table


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-wer", "1.5"], "--target-wer must be a fraction in (0, 1), got 1.5"),
        (["--strategies", "packed,foo"], "--strategies must be distinct names"),
        (["--strategies", "packed,packed"], "--strategies must be distinct names"),
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--max-steps", "5"], "--max-steps 5 must be a multiple of --val-every 2"),
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--budget-seconds", "-1"], "--budget-seconds must be > 0, got -1.0"),
        (["--model.d_model"], "--model.d_model needs a value: --model.d_model=VALUE"),
        (["--model.no_such_key=1"], "unknown config key --model.no_such_key"),
        (["--model.tie_embeddings=flase"], "expected true or false, got 'flase'"),
        (["--config", "nope.yaml"], "--config 'nope.yaml' does not exist"),
    ],
)
def test_bad_flags_are_one_line_errors(corpus, tmp_path, capsys, extra, message):
    assert main(bench_args(corpus, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "convergence.json").exists()


def test_missing_data_names_the_flag(tmp_path, capsys):
    args = ["bench", "convergence", "--config", str(tmp_path / "c.yaml"), "--data", str(tmp_path)]
    (tmp_path / "c.yaml").write_text(CONFIG)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--train-cuts" in err and "does not exist" in err and len(err.splitlines()) == 1
