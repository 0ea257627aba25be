import gzip
import json

import pytest

from speedasr.bench.padding import STRATEGIES, auto_buckets, benchmark, synthetic_corpus
from speedasr.cli import main
from speedasr.testing import make_bad_input_cuts

KEYS = {
    "padding_frames",
    "padding_tokens",
    "padding_attention",
    "batches",
    "mean_cuts_per_batch",
    "mean_real_seconds_per_batch",
    "cuts_per_second",
    "cuts_seen",
    "cuts_rejected",
}


@pytest.fixture(scope="module")
def result():
    return benchmark(
        synthetic_corpus(4.0, seed=2), budget=120.0, num_buckets=8, num_token_buckets=4
    )


def test_result_shape_and_invariants(result):
    assert set(result["strategies"]) == set(STRATEGIES)
    total = result["corpus"]["cuts"]
    for name, s in result["strategies"].items():
        assert KEYS <= set(s), name
        assert s["cuts_seen"] + s["cuts_rejected"] == total, name
        for k in ("padding_frames", "padding_tokens", "padding_attention"):
            assert 0.0 <= s[k] < 1.0
    packed = result["strategies"]["packed"]
    assert packed["padding_frames"] == packed["padding_tokens"] == packed["padding_attention"] == 0
    assert packed["max_batch_seconds_computed"] <= 120.0
    s = result["strategies"]
    assert s["bucket2d"]["padding_tokens"] < s["bucket1d"]["padding_tokens"]
    assert s["bucket1d"]["padding_frames"] < s["random"]["padding_frames"]
    assert packed["batches"] <= min(s[k]["batches"] for k in ("random", "bucket1d", "bucket2d"))
    assert s["bucket2d"]["rejected"]["counts"].get("tps_outlier", 0) >= 1
    json.dumps(result)  # public output: must serialize


def test_auto_buckets_scale_with_corpus():
    assert auto_buckets(1000 * 3600, 600) == (30, 5)
    assert auto_buckets(100, 600) == (1, 1)
    d, k = auto_buckets(8 * 3600, 600)
    assert d * k <= 8 * 3600 / (4 * 600)


def write_tsv(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("utt_id\tduration_seconds\ttext\n")
        for r in rows:
            f.write("\t".join(map(str, r)) + "\n")


def test_cli_on_tsv_and_manifest(tmp_path, capsys):
    tsv = tmp_path / "lengths.tsv.gz"
    rows = [(f"u{i}", 1.5 + (i % 17) * 0.4, 'kata "kutip" ' * (1 + i % 5)) for i in range(300)]
    write_tsv(tsv, rows)
    out = tmp_path / "out.json"
    args = [
        "bench",
        "padding",
        "--cuts",
        str(tsv),
        "--budget-seconds",
        "30",
        "--json",
        str(out),
        "--repeats",
        "1",
        "--language",
        "id",
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert set(data["strategies"]) == set(STRATEGIES)
    assert data["strategies"]["packed"]["cuts_seen"] == 300
    assert "| packed | 0.0% | 0.0% | 0.0% |" in capsys.readouterr().out
    manifest = tmp_path / "cuts.jsonl.gz"
    synthetic_corpus(0.3, seed=1).to_file(manifest)
    assert (
        main(
            [
                "bench",
                "padding",
                "--cuts",
                str(manifest),
                "--budget-seconds",
                "40",
                "--repeats",
                "1",
            ]
        )
        == 0
    )


def test_cli_errors(tmp_path, capsys):
    assert (
        main(["bench", "padding", "--cuts", str(tmp_path / "x.tsv"), "--budget-seconds", "30"]) == 2
    )
    bad = tmp_path / "bad.tsv.gz"
    write_tsv(bad, [("a", "notanumber", "x")])
    assert main(["bench", "padding", "--cuts", str(bad), "--budget-seconds", "30"]) == 2
    assert "line 2" in capsys.readouterr().err
    good = tmp_path / "good.tsv.gz"
    write_tsv(good, [("a", 2.0, "x")])
    assert main(["bench", "padding", "--cuts", str(good), "--budget-seconds", "0"]) == 2


METADATA_REASONS = {"duplicate_id", "command_source", "bad_duration", "empty_text"}
FILE_REASONS = {"missing_audio", "corrupt_audio", "header_mismatch", "non_finite_samples"}


@pytest.mark.parametrize("check_audio", ["none", "full"])
def test_every_cut_not_batched_is_counted_with_its_reason(tmp_path, check_audio):
    cuts, expected = make_bad_input_cuts(tmp_path)
    result = benchmark(cuts, budget=4.0, check_audio=check_audio)
    # What the metadata shows is always counted; files are opened only when asked to.
    reasons = METADATA_REASONS | (FILE_REASONS if check_audio == "full" else set())
    not_batched = {cut_id for cut_id, reason in expected.items() if reason in reasons}
    assert result["corpus"]["cuts"] == len(cuts)
    assert result["corpus"]["validation"]["counts"] == {r: 1 for r in reasons}
    for name, s in result["strategies"].items():
        batched = s["cuts_seen"]
        assert batched == len(cuts) - len(not_batched), name
        assert batched + s["cuts_rejected"] == len(cuts), name
        assert s["rejected"]["counts"] == {r: 1 for r in reasons}, name
        examples = {i for ids in s["rejected"]["examples"].values() for i in ids}
        assert examples == not_batched, name
    assert not (tmp_path / "EXECUTED").exists()
