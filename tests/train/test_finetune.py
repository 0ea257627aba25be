"""Fine-tuning an imported NeMo Canary model: ``init_from`` -> packed training with NeMo's front
end, aggregate tokenizer and canary2 prompt -> ``export-nemo`` of the run's checkpoint ->
``import-nemo`` gives the fine-tuned weights back bit for bit, with the changed setting in NeMo's
config."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from speedasr.cli import main
from speedasr.nemo.archive import read_nemo
from speedasr.nemo.import_nemo import import_nemo
from speedasr.testing import make_tiny_cuts

NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"
STEPS = 5
# One batch per epoch (4 cuts, one bucket, no shuffling): every step trains on the same batch,
# so its loss must fall. No dropout (a change from the checkpoint's 0.1), no SpecAugment.
CONFIG = f"""\
init_from: IMPORTED
model: {{dropout: 0.0}}
sampler: {{mode: packed, max_duration: 100.0, num_buckets: 1, num_token_buckets: 1,
          shuffle: false, strict: false}}
optim: {{lr: 0.001, warmup_steps: 0, schedule: constant}}
trainer: {{max_epochs: null, max_steps: {STEPS}, enable_progress_bar: false, log_every_n_steps: 1,
          accelerator: cpu, devices: 1, check_val_every_n_epoch: {STEPS}}}
monitors: {{padding: true, gpu: false, throughput: false}}
data: {{num_workers: 0, spec_augment: {{enabled: false}}, val_max_utterances: 2}}
"""


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    import_nemo(NEMO, root / "imported")
    make_tiny_cuts(root / "data", n=4, seed=0, speech=True)
    config = root / "finetune.yaml"
    config.write_text(CONFIG.replace("IMPORTED", str(root / "imported")))
    cuts = str(root / "data/cuts.jsonl.gz")
    code = main([
        "train", "--config", str(config), "--out_dir", str(root / "exp"),
        "--data.train_cuts", cuts, "--data.dev_cuts", cuts,
    ])  # fmt: skip
    assert code == 0
    return root


def _metrics(root: Path) -> list[dict]:
    path = next((root / "exp/logs").glob("version_*/metrics.csv"))
    return list(csv.DictReader(path.open()))


def test_loss_falls_on_the_training_batch(finetuned):
    losses = [float(r["train/loss"]) for r in _metrics(finetuned) if r.get("train/loss")]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert any(r.get("val/wer") for r in _metrics(finetuned))  # validation decoded with it
    padding = [
        float(r["padding/step/tokens"]) for r in _metrics(finetuned) if r.get("padding/step/tokens")
    ]
    assert len(padding) == STEPS and set(padding) == {0.0}  # packed: no padded token


def test_run_trains_the_checkpoints_model_with_nemo_data(finetuned):
    saved = yaml.safe_load((finetuned / "exp/config.yaml").read_text())
    imported = torch.load(finetuned / "imported/model.ckpt", weights_only=True)
    expected = {**imported["hyper_parameters"]["model"], "dropout": 0.0}
    assert {k: saved["model"][k] for k in expected} == expected
    last = torch.load(finetuned / "exp/checkpoints/last.ckpt", weights_only=True)
    assert last["tokenizer"] == imported["tokenizer"]  # the aggregate tokenizer, canary2
    assert last["nemo"] == imported["nemo"]  # what export-nemo needs
    assert last["global_step"] == STEPS
    before, after = imported["state_dict"], last["state_dict"]
    assert set(before) == set(after)
    assert not torch.equal(before["model.encoder.blocks.0.ff1.up.weight"],
                           after["model.encoder.blocks.0.ff1.up.weight"])  # fmt: skip
    # NeMo's front-end tables are buffers: the run keeps the checkpoint's exactly.
    assert torch.equal(before["model.frontend.fb"], after["model.frontend.fb"])


def test_export_then_import_gives_the_finetuned_weights(finetuned, tmp_path, capsys):
    ckpt = finetuned / "exp/checkpoints/last.ckpt"
    out = tmp_path / "finetuned.nemo"
    assert main(["export-nemo", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert "encoder.dropout: 0.1 -> 0.0" in capsys.readouterr().out
    config = read_nemo(out).config
    original = read_nemo(NEMO).config
    assert config["encoder"]["dropout"] == 0.0
    original["encoder"]["dropout"] = 0.0
    assert config == original  # nothing else changed
    again = torch.load(import_nemo(out, tmp_path / "again").checkpoint, weights_only=True)
    last = torch.load(ckpt, weights_only=True)
    assert again["hyper_parameters"]["model"] == last["hyper_parameters"]["model"]
    assert set(again["state_dict"]) == set(last["state_dict"])
    for key, tensor in last["state_dict"].items():
        assert torch.equal(again["state_dict"][key], tensor), key


def test_shape_changing_setting_is_a_one_line_error(finetuned, tmp_path, capsys):
    cuts = str(finetuned / "data/cuts.jsonl.gz")
    code = main([
        "train", "--init_from", str(finetuned / "imported"), "--model.ff_mult=2",
        "--out_dir", str(tmp_path / "exp"), "--data.train_cuts", cuts,
        "--trainer.max_steps=1", "--data.num_workers=0",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert "does not fit this model" in err[0] and "shapes differ" in err[0]
    assert "ff_mult 4 -> 2" in err[0]


def test_tokenizer_and_init_from_together_are_refused(finetuned, tmp_path, capsys):
    code = main([
        "train", "--init_from", str(finetuned / "imported"), "--data.tokenizer", str(tmp_path),
        "--out_dir", str(tmp_path / "exp"), "--data.train_cuts", "x.jsonl.gz",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "data.tokenizer and init_from" in err


def test_missing_init_from_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--init_from", str(tmp_path / "nope"), "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "init_from" in err[0] and "does not exist" in err[0]


def test_init_from_a_speedasr_checkpoint_takes_its_weights_not_its_progress(tmp_path):
    """With a zero learning rate the run ends with the checkpoint's weights, bit for bit; its step
    counter starts at 0 (the untrained checkpoint says nothing of steps to resume)."""
    from speedasr.testing import write_untrained_checkpoint

    ckpt = write_untrained_checkpoint(tmp_path / "pre", seed=3)
    make_tiny_cuts(tmp_path / "data", n=2, seed=0, speech=True)
    code = main([
        "train", "--init_from", str(ckpt), "--out_dir", str(tmp_path / "exp"),
        "--data.train_cuts", str(tmp_path / "data/cuts.jsonl.gz"), "--data.num_workers=0",
        "--optim.lr=0", "--optim.warmup_steps=0", "--trainer.max_steps=2",
        "--trainer.max_epochs=null", "--trainer.enable_progress_bar=false",
        "--monitors.gpu=false",
    ])  # fmt: skip
    assert code == 0
    before = torch.load(ckpt, weights_only=True)
    after = torch.load(tmp_path / "exp/checkpoints/last.ckpt", weights_only=True)
    assert after["global_step"] == 2 and after["tokenizer"] == before["tokenizer"]
    assert after["hyper_parameters"]["model"] == before["hyper_parameters"]["model"]
    assert "nemo" not in after
    assert set(after["state_dict"]) == set(before["state_dict"])
    for key, tensor in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], tensor), key
