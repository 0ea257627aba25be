import json

import pytest
import torch

from speedasr.bench.rtfx import Split, Utterances, benchmark, build_model, parse_splits, render
from speedasr.cli import main


def utterances():
    g = torch.Generator().manual_seed(0)
    frames = [120, 64, 200]
    return Utterances(
        [torch.randn(n, 80, generator=g) for n in frames], [n / 100 for n in frames], [5, 2, 7]
    )


def test_parse_splits():
    assert parse_splits("a=10/10, b=16/2") == [Split("a", 10, 10), Split("b", 16, 2)]


@pytest.mark.parametrize("bad", ["a=10", "10/10", "a=x/2", "a=0/2", "a=1/1,a=2/2"])
def test_bad_splits_are_user_errors(bad, capsys):
    assert main(["bench", "rtfx", "--splits", bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_benchmark_rows_count_forced_tokens_and_flops():
    utts = utterances()
    splits = [Split("balanced", 2, 2), Split("deep", 3, 1)]
    rows = benchmark(splits, utts, [1, 2], repeats=1, d_model=32, heads=2, vocab_size=64)
    assert [(r["name"], r["batch_size"]) for r in rows] == [
        ("balanced", 1), ("balanced", 2), ("deep", 1), ("deep", 2),
    ]  # fmt: skip
    for r in rows:
        assert r["rtfx"] > 0 and r["encoder_s"] > 0 and r["decoder_s"] > 0
        assert r["speedup_paired"] > 0
        # one decoder call per forced token of the longest utterance of each batch
        assert r["decoder_steps"] == (5 + 2 + 7 if r["batch_size"] == 1 else 5 + 7)
    by_name = {r["name"]: r for r in rows}
    # deeper encoder, shallower decoder: more encoder FLOPs, fewer decoder FLOPs
    assert by_name["deep"]["encoder_gflop"] > by_name["balanced"]["encoder_gflop"]
    assert by_name["deep"]["decoder_gflop"] < by_name["balanced"]["decoder_gflop"]
    assert "| deep | 3/1 |" in render(rows)


def test_reference_decoder_timing_is_optional():
    rows = benchmark([Split("a", 1, 2)], utterances(), [3], 1, 32, 2, 64, reference=True)
    assert rows[0]["ms_per_step_no_cache"] > 0 and "no cache" in render(rows)


def test_command_writes_json(tmp_path, capsys):
    out = tmp_path / "rtfx.json"
    argv = ["bench", "rtfx", "--utterances", "2", "--repeats", "1", "--d-model", "32", "--heads",
            "2", "--splits", "a=2/2,b=3/1", "--batch-sizes", "1,2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert len(data["configs"]) == 4
    for row in data["configs"]:
        assert set(row) == {"name", "encoder_layers", "decoder_layers", "params", "batch_size",
                            "rtfx"}  # fmt: skip
    assert "RTFx" in capsys.readouterr().out


def test_command_in_bfloat16_records_dtype_and_threads(tmp_path):
    out = tmp_path / "rtfx.json"
    argv = ["bench", "rtfx", "--utterances", "2", "--repeats", "1", "--d-model", "32", "--heads",
            "2", "--splits", "a=2/1", "--batch-sizes", "2", "--dtype", "bfloat16", "--threads",
            "1", "--json", str(out)]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["threads"] == 1 and data["configs"][0]["rtfx"] > 0


def test_build_model_casts_to_the_requested_dtype():
    m = build_model(Split("a", 2, 1), 32, 2, 64, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
