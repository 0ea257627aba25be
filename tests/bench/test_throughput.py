import json
from types import SimpleNamespace

import pytest

from speedasr.bench import throughput
from speedasr.bench.throughput import activation_bytes, collate_batches, run_benchmark
from speedasr.cli import main
from speedasr.data.dataset import AsrDataset
from speedasr.data.tokenizer import Tokenizer
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.testing import make_tiny_cuts, tiny_texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    tok = Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=100)
    cuts = make_tiny_cuts(root / "cuts", n=10, seed=0, durations=(0.5, 2.0))
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, d_model=32, encoder_layers=1,
        encoder_heads=2, decoder_layers=1, subsampling_channels=8, attention_backend="torch",
    )  # fmt: skip
    return root, tok, cuts, cfg


def test_strategies_respect_budget_and_layout(setup):
    _, tok, cuts, cfg = setup
    for strategy in ("random", "bucket2d", "packed"):
        batches = collate_batches(
            cuts, tok, strategy, budget=4.0, steps=100, seed=0, n_mels=cfg.n_mels
        )
        assert sum(b.batch_size for b in batches) == len(cuts)
        for b in batches:
            if strategy == "packed":
                assert sum(b.durations) <= 4.0 + 1e-6
                assert b.features.dim() == 2
            else:
                assert b.batch_size * max(b.durations) <= 4.0 + 1e-6
                assert b.features.dim() == 3


def test_activation_bytes_grow_with_the_batch(setup):
    _, tok, cuts, cfg = setup
    model = AEDModel(cfg)
    small = AsrDataset(tok, n_mels=cfg.n_mels)[cuts.subset(first=2)]
    large = AsrDataset(tok, n_mels=cfg.n_mels)[cuts]
    assert 0 < activation_bytes(model, small) < activation_bytes(model, large)


def cli_args(root, out, repeats: int) -> list[str]:
    """``bench throughput`` on the fixture's cuts with a tiny model, one batch per pass."""
    return ["bench", "throughput", "--cuts", str(root / "cuts/cuts.jsonl.gz"), "--tokenizer",
            str(root / "tok"), "--budget-seconds", "4", "--steps", "1", "--repeats", str(repeats),
            "--model.d_model=32", "--model.encoder_layers=1", "--model.encoder_heads=2",
            "--model.decoder_layers=1", "--model.subsampling_channels=8",
            "--json", str(out)]  # fmt: skip


def test_run_benchmark_and_cli_json(setup, tmp_path):
    root, tok, cuts, cfg = setup
    results = run_benchmark(cuts, tok, cfg, budget=4.0, steps=2, repeats=1, progress=lambda s: None)
    assert set(results) == {"random", "bucket2d", "packed"}
    assert all(v == 0.0 for v in results["packed"].padding.values())
    assert results["random"].padding["padding_frames"] > 0
    assert all(r.audio_seconds_per_second > 0 for r in results.values())
    out = tmp_path / "tp.json"
    assert main(cli_args(root, out, repeats=1)) == 0
    data = json.loads(out.read_text())
    for k in ("random", "bucket2d", "packed"):
        assert {"audio_seconds_per_second", "peak_memory_bytes"} <= set(data["strategies"][k])
    model = data["settings"]["model"]  # the --model.* overrides on top of the tiny preset
    assert (model["d_model"], model["encoder_layers"], model["subsampling_channels"]) == (32, 1, 8)


def test_cli_override_errors_name_the_key(capsys):
    base = ["bench", "throughput", "--cuts", "c.jsonl.gz", "--tokenizer", "tok"]
    assert main([*base, "--model.encoder_layer=1"]) == 2
    assert "did you mean --model.encoder_layers?" in capsys.readouterr().err
    assert main([*base, "--model.dropout=high"]) == 2
    assert "--model.dropout=high: expected a number" in capsys.readouterr().err


def test_passes_interleave_and_ratios_pair_repeats(setup, tmp_path, monkeypatch):
    """A fake clock gives the k-th timed pass a scripted duration. Interleaved passes (random,
    bucket2d, packed, random, ...) give strategy s in repeat i the duration of pass 3 i + s; the
    ratios are medians of per-repeat ratios, hand-computed below."""
    # Rate per audio second of each strategy in repeats 0, 1, 2 (duration = audio / rate).
    per_audio_rate = {"random": [10, 40, 20], "bucket2d": [20, 25, 40], "packed": [30, 50, 60]}
    durations = [1 / per_audio_rate[s][i] for i in range(3) for s in throughput.STRATEGIES]
    timestamps = []
    for k, duration in enumerate(durations):  # start, end of each pass; gaps between passes
        timestamps += [10.0 * k, 10.0 * k + duration]
    clock = iter(timestamps)
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: next(clock)))

    root, *_ = setup
    out = tmp_path / "tp.json"
    assert main(cli_args(root, out, repeats=3)) == 0
    assert next(clock, None) is None  # exactly 9 timed passes
    data = json.loads(out.read_text())
    audio = {s: v["audio_seconds"] for s, v in data["strategies"].items()}
    for s, rates in per_audio_rate.items():
        assert data["strategies"][s]["repeats"] == pytest.approx([audio[s] * r for r in rates])
    # packed / random per repeat: 30/10, 50/40, 60/20 = 3, 1.25, 3 -> 3 (ratio of medians: 2.5);
    # packed / bucket2d: 30/20, 50/25, 60/40 = 1.5, 2, 1.5 -> 1.5 (ratio of medians: 2).
    ratios = data["ratios"]
    assert ratios["packed_over_random"] == pytest.approx(3.0 * audio["packed"] / audio["random"])
    assert ratios["packed_over_bucket2d"] == pytest.approx(
        1.5 * audio["packed"] / audio["bucket2d"]
    )
