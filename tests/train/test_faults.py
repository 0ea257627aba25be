"""Fault tolerance and untrusted inputs: bad steps skipped, bad cuts reported, nothing executed."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile as sf
import torch
from lhotse import CutSet
from lhotse.audio import AudioSource

from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.faults import FaultMonitor


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speedasr.cli", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )  # fmt: skip


# --- FaultMonitor in a plain Lightning project ---------------------------------------------------


class _Toy(pl.LightningModule):
    """y = w·x; the loss is NaN at the batches listed in ``nan_at``, inf gradient at ``inf_at``."""

    def __init__(self, nan_at=(), inf_at=()):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_at, self.inf_at = set(nan_at), set(inf_at)
        self.weights = {}

    def training_step(self, batch, batch_idx):
        self.weights[batch_idx] = self.layer.weight.detach().clone()
        loss = self.layer(batch).pow(2).mean()
        if batch_idx in self.nan_at:
            loss = loss * float("nan")
        if batch_idx in self.inf_at:
            loss = loss + self.layer.weight.sum() * float("inf")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def test_non_finite_steps_are_skipped_and_counted():
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.randn(6, 4), batch_size=None)
    module, faults = _Toy(nan_at={1}, inf_at={3}), FaultMonitor()
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[faults], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(module, data)
    w = module.weights
    assert torch.equal(w[1], w[2]) and torch.equal(w[3], w[4])  # skipped: nothing moved
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[2], w[3])  # the others stepped
    assert torch.isfinite(module.layer.weight).all()
    assert faults.skipped_steps == {"non_finite_loss": 2}  # inf·w makes the loss inf too
    assert "2 optimizer steps skipped" in faults.summary()
    state = faults.state_dict()
    restored = FaultMonitor()
    restored.load_state_dict(state)
    assert restored.summary() == faults.summary()


def test_non_finite_gradient_alone_is_skipped():
    class GradOnly(_Toy):
        def on_after_backward(self):
            if self.trainer.global_step == 2:
                self.layer.bias.grad.fill_(float("nan"))

    data = torch.utils.data.DataLoader(torch.randn(5, 4), batch_size=None)
    module, faults = GradOnly(), FaultMonitor()
    pl.Trainer(
        max_epochs=1, accelerator="cpu", callbacks=[faults], logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
    ).fit(module, data)  # fmt: skip
    assert faults.skipped_steps == {"non_finite_grad": 1}
    assert torch.equal(module.weights[2], module.weights[3])


# --- a cutset seeded with bad entries trains to the end ------------------------------------------


def _bad_cutset(root: Path, marker: Path) -> tuple[Path, dict[str, str]]:
    """Good tiny cuts plus one bad entry per failure mode; returns (cuts path, {id: reason})."""
    good = make_tiny_cuts(root / "good", n=8, seed=0, speech=True)
    long = make_tiny_cuts(root / "long", n=1, seed=9, durations=(9.0, 9.5))
    template = list(good)[0]
    audio = root / "bad_audio"
    audio.mkdir()
    bad, expected = [], {}

    def variant(name, reason, **changes):
        cut = template.with_id(f"bad-{name}")
        cut = cut.__class__(**{**cut.__dict__, **changes})
        cut.supervisions = [s.with_cut_id(cut.id) if hasattr(s, "with_cut_id") else s
                            for s in cut.supervisions]  # fmt: skip
        bad.append(cut)
        expected[cut.id] = reason
        return cut

    def recording_from(path: Path, rid: str, **changes):
        rec = template.recording
        sources = [AudioSource(type="file", channels=[0], source=str(path))]
        return rec.__class__(**{**rec.__dict__, "id": rid, "sources": sources, **changes})

    variant("missing", "missing_audio", recording=recording_from(audio / "nope.flac", "r-missing"))
    (audio / "corrupt.flac").write_bytes(b"not a flac file at all" * 100)
    variant("corrupt", "corrupt_audio", recording=recording_from(audio / "corrupt.flac", "r-c"))
    variant("zero", "bad_duration", duration=0.0)
    empty = variant("empty", "empty_text")
    empty.supervisions = [empty.supervisions[0].transform_text(lambda _: "  ")]
    n = template.recording.num_samples
    nan_audio = np.random.default_rng(0).normal(0, 0.1, n).astype(np.float32)
    nan_audio[n // 2] = np.nan
    sf.write(audio / "nan.wav", nan_audio, 16000, subtype="FLOAT")
    variant("nan", "non_finite_samples", recording=recording_from(audio / "nan.wav", "r-nan"))
    sf.write(audio / "sr8k.wav", nan_audio[: n // 2] * 0, 8000)
    variant("rate", "header_mismatch", recording=recording_from(audio / "sr8k.wav", "r-sr"))
    command = AudioSource(type="command", channels=[0], source=f"touch {marker}; cat /dev/null")
    rec = template.recording
    rec = rec.__class__(**{**rec.__dict__, "id": "r-cmd", "sources": [command]})
    variant("command", "command_source", recording=rec)
    dup = list(good)[1]
    bad.append(dup)  # second occurrence of an id
    expected["_dup"] = "duplicate_id"
    long_cut = list(long)[0]
    bad.append(long_cut)
    expected[long_cut.id] = "too_long"
    path = root / "cuts.jsonl.gz"
    CutSet.from_cuts(list(good)[:4] + bad[:5] + list(good)[4:] + bad[5:]).to_file(path)
    return path, expected


@pytest.mark.slow
def test_bad_entries_are_reported_and_training_finishes(tmp_path):
    marker = tmp_path / "command-ran"
    cuts, expected = _bad_cutset(tmp_path, marker)
    Tokenizer.train(tiny_texts(200, seed=1), tmp_path / "tok", vocab_size=96)
    (tmp_path / "c.yaml").write_text(
        "model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,"
        " subsampling_channels: 8}\n"
        "sampler: {mode: packed, max_duration: 8.0, num_buckets: 2, num_token_buckets: 1}\n"
        "trainer: {max_epochs: 1, enable_progress_bar: false, accelerator: cpu, devices: 1}\n"
        "monitors: {padding: false, gpu: false, throughput: false}\n"
        "data: {num_workers: 1, max_duration: 8.0}\n"
    )
    proc = cli(
        "train", "--config", str(tmp_path / "c.yaml"), "--out_dir", str(tmp_path / "exp"),
        "--data.train_cuts", str(cuts), "--data.tokenizer", str(tmp_path / "tok"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()  # the command source never ran
    rows = [json.loads(x) for x in (tmp_path / "exp/rejects_train.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (tmp_path / "exp/skipped_train.jsonl").read_text().splitlines()]
    reasons = {r["cut_id"]: r["reason"] for r in rows}
    dup = expected.pop("_dup")
    assert dup in reasons.values()
    for cut_id, reason in expected.items():
        assert reasons.get(cut_id) == reason, (cut_id, reasons.get(cut_id), rows)
    assert "cuts skipped mid-training" in proc.stdout
    assert "Faults:" in proc.stdout
    assert (tmp_path / "exp/checkpoints/last.ckpt").is_file()


# --- untrusted checkpoints and configs run no code -----------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_resume_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "x": _Evil(marker)}, evil)
    make_tiny_cuts(tmp_path / "d", n=2, seed=0)
    Tokenizer.train(tiny_texts(50, seed=1), tmp_path / "tok", vocab_size=60)
    proc = cli(
        "train", "--out_dir", str(tmp_path / "exp"), "--resume", str(evil),
        "--data.train_cuts", str(tmp_path / "d/cuts.jsonl.gz"),
        "--data.tokenizer", str(tmp_path / "tok"),
    )  # fmt: skip
    assert proc.returncode == 2 and "refused" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    with open(tmp_path / "raw.ckpt", "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump({"x": _Evil(marker)}, f)
    proc = cli("train", "--out_dir", str(tmp_path / "exp"), "--resume", str(tmp_path / "raw.ckpt"),
               "--data.train_cuts", str(tmp_path / "d/cuts.jsonl.gz"),
               "--data.tokenizer", str(tmp_path / "tok"))  # fmt: skip
    assert proc.returncode == 2 and not marker.exists()


def test_yaml_config_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "c.yaml"
    config.write_text(f'out_dir: !!python/object/apply:os.system ["touch {marker}"]\n')
    proc = cli("train", "--config", str(config), "--print-config")
    assert proc.returncode == 2 and "could not determine a constructor" in proc.stderr
    assert not marker.exists()
