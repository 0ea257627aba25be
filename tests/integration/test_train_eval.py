"""`speedasr train` -> checkpoint -> `speedasr eval` / `transcribe`, end to end on tiny speech."""

import csv
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speedasr.checkpoint import load_model
from speedasr.testing import make_tiny_cuts

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "speedasr.cli", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )  # fmt: skip
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_tiny_cuts(root / "train", n=12, seed=0, speech=True)
    make_tiny_cuts(root / "dev", n=4, seed=1, speech=True)
    tok = cli("tokenizer", "train", "--cuts", str(root / "train/cuts.jsonl.gz"),
              "--out", str(root / "tok"), "--vocab-size", "96")  # fmt: skip
    assert tok.returncode == 0, tok.stderr
    config = root / "c.yaml"
    config.write_text(
        "model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,"
        " subsampling_channels: 8}\n"
        "sampler: {mode: packed, max_duration: 8.0, num_buckets: 2, num_token_buckets: 1}\n"
        "optim: {lr: 0.003, warmup_steps: 2}\n"
        "trainer: {max_epochs: null, max_steps: 6, val_check_interval: 3,"
        " check_val_every_n_epoch: null, enable_progress_bar: false, log_every_n_steps: 1}\n"
        "data: {num_workers: 0}\n"
    )
    proc = cli(
        "train", "--config", str(config), "--out_dir", str(root / "exp"),
        "--data.train_cuts", str(root / "train/cuts.jsonl.gz"),
        "--data.dev_cuts", str(root / "dev/cuts.jsonl.gz"), "--data.tokenizer", str(root / "tok"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_training_writes_checkpoint_logs_and_summary(trained):
    root, proc = trained
    assert "Padding over" in proc.stdout and "0.0%" in proc.stdout
    assert (root / "exp/checkpoints/last.ckpt").is_file()
    metrics = next((root / "exp/logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("val/wer") for r in rows)
    assert any(r.get("val/ctc_wer") for r in rows)  # the model has a CTC head (ctc_weight 0.3)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 5
    assert (root / "exp/rejects_train.jsonl").exists()


def test_eval_and_transcribe(trained):
    root, _ = trained
    ckpt = str(root / "exp/checkpoints/last.ckpt")
    proc = cli("eval", "--ckpt", ckpt, "--cuts", str(root / "dev/cuts.jsonl.gz"),
               "--out", str(root / "res.jsonl"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WER" in proc.stdout and "RTFx" in proc.stdout
    assert len((root / "res.jsonl").read_text().splitlines()) == 4
    proc = cli("eval", "--ckpt", ckpt, "--cuts", str(root / "dev/cuts.jsonl.gz"),
               "--decoder", "ctc")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CTC greedy" in proc.stdout
    proc = cli("eval", "--ckpt", ckpt, "--cuts", str(root / "dev/cuts.jsonl.gz"),
               "--ctc-weight", "0.3", "--beam-size", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "beam 2 joint with CTC (weight 0.3)" in proc.stdout
    audio = sorted((root / "dev/audio").iterdir())[:2]
    proc = cli("transcribe", "--ckpt", ckpt, *map(str, audio))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 2


def test_checkpoint_is_self_contained_and_safe(trained, tmp_path):
    root, _ = trained
    ckpt = root / "exp/checkpoints/last.ckpt"
    torch.load(ckpt, weights_only=True)  # loads without unpickling arbitrary objects
    loaded = load_model(ckpt)
    assert loaded.tokenizer.vocab_size == loaded.config.vocab_size

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Evil()}, f)
    proc = cli("eval", "--ckpt", str(evil), "--cuts", str(root / "dev/cuts.jsonl.gz"))
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not marker.exists()


def test_checkpoint_from_before_block_out_norm_loads(trained, tmp_path):
    # Older checkpoints have no `block_out_norm` key and a LayerNorm at the end of every block.
    from dataclasses import asdict, replace

    from speedasr.core.segments import Segments
    from speedasr.models.aed import AEDModel

    root, _ = trained
    ckpt = torch.load(root / "exp/checkpoints/last.ckpt", weights_only=True)
    config = replace(load_model(root / "exp/checkpoints/last.ckpt").config, block_out_norm=True)
    torch.manual_seed(0)
    old = AEDModel(config).eval()
    ckpt["state_dict"] = {f"model.{k}": v for k, v in old.state_dict().items()}
    ckpt["hyper_parameters"]["model"] = {
        k: v for k, v in asdict(config).items() if k != "block_out_norm"
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = load_model(tmp_path / "old.ckpt")
    assert loaded.config.block_out_norm
    x, seg = torch.randn(50, config.n_mels), Segments.from_lengths([50])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode(x, seg)[0], old.encode(x, seg)[0])


def test_checkpoint_with_unknown_model_settings_is_a_clear_error(trained, tmp_path):
    root, _ = trained
    ckpt = torch.load(root / "exp/checkpoints/last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"]["absolute_positions"] = True  # from another version
    torch.save(ckpt, tmp_path / "other.ckpt")
    proc = cli("eval", "--ckpt", str(tmp_path / "other.ckpt"),
               "--cuts", str(root / "dev/cuts.jsonl.gz"))  # fmt: skip
    assert proc.returncode == 2
    assert "does not know: absolute_positions" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_last_checkpoint_holds_the_final_step(trained):
    root, _ = trained
    ckpt = torch.load(root / "exp/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6  # max_steps of the fixture's config
