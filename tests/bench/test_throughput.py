import json

import pytest

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
    _, tok, cuts, _ = setup
    for strategy in ("random", "bucket2d", "packed"):
        batches = collate_batches(cuts, tok, strategy, budget=4.0, steps=100, seed=0)
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
    small = AsrDataset(tok)[cuts.subset(first=2)]
    large = AsrDataset(tok)[cuts]
    assert 0 < activation_bytes(model, small) < activation_bytes(model, large)


def test_run_benchmark_and_cli_json(setup, tmp_path):
    root, tok, cuts, cfg = setup
    results = run_benchmark(cuts, tok, cfg, budget=4.0, steps=2, repeats=1, progress=lambda s: None)
    assert set(results) == {"random", "bucket2d", "packed"}
    assert all(v == 0.0 for v in results["packed"].padding.values())
    assert results["random"].padding["padding_frames"] > 0
    assert all(r.audio_seconds_per_second > 0 for r in results.values())
    out = tmp_path / "tp.json"
    args = ["bench", "throughput", "--cuts", str(root / "cuts/cuts.jsonl.gz"), "--tokenizer",
            str(root / "tok"), "--budget-seconds", "4", "--steps", "1", "--repeats", "1",
            "--set", "d_model=32", "encoder_layers=1", "encoder_heads=2", "decoder_layers=1",
            "subsampling_channels=8", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    for k in ("random", "bucket2d", "packed"):
        assert {"audio_seconds_per_second", "peak_memory_bytes"} <= set(data["strategies"][k])
