"""Shar export and training input: the same cuts and batches as the JSON-lines cutset."""

import subprocess
import sys

import pytest
import torch
from lhotse import CutSet
from lhotse.audio import AudioSource

from speedasr.data.sampling import SamplerConfig
from speedasr.data.shar import load_validated_shar, open_shar
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.prep.shar_export import export_shar
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.datamodule import AsrDataModule, DataConfig


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speedasr.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("shar")
    cuts = make_tiny_cuts(root / "src", n=10, seed=0, speech=True)
    marker = root / "command-ran"
    first = list(cuts)[0]
    rec = first.recording
    command = AudioSource(type="command", channels=[0], source=f"touch {marker}")
    bad = first.with_id("cmd-cut")
    bad.recording = rec.__class__(**{**rec.__dict__, "id": "cmd-rec", "sources": [command]})
    CutSet.from_cuts([*cuts, bad]).to_file(root / "with_bad.jsonl.gz")
    proc = cli("data", "export-shar", "--cuts", str(root / "with_bad.jsonl.gz"),
               "--out", str(root / "shar"), "--shard-size", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()  # the command source was refused, not run
    assert "command_source 1" in proc.stdout
    Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=96)
    return root


def test_export_writes_shards_with_audio(exported):
    shar = exported / "shar"
    assert len(list(shar.glob("cuts.*.jsonl.gz"))) == 3  # 10 cuts, 4 per shard
    assert len(list(shar.glob("recording.*.tar"))) == 3
    src = CutSet.from_file(exported / "src/cuts.jsonl.gz")
    from_shar = list(open_shar(shar))
    assert [c.id for c in from_shar] == [c.id for c in src]
    for a, b in zip(src, from_shar, strict=True):
        assert (a.load_audio() == b.load_audio()).all()  # flac is lossless


def test_training_batches_from_shar_equal_those_from_jsonl(exported):
    def epoch(path):
        data = DataConfig(train_cuts=str(path), tokenizer=str(exported / "tok"), num_workers=0)
        sampler = SamplerConfig(max_duration=6.0, num_buckets=2, num_token_buckets=1)
        dm = AsrDataModule(data, sampler, n_mels=80, seed=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        return dm, list(loader)

    dm_a, a = epoch(exported / "src/cuts.jsonl.gz")
    dm_b, b = epoch(exported / "shar")
    assert dm_b.reports["train"].accepted == dm_a.reports["train"].accepted == 10
    assert [x.cut_ids for x in a] == [x.cut_ids for x in b]
    assert sum(len(x.cut_ids) for x in b) == 10
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.features, y.features)  # same audio, same augmentation seeds
        assert torch.equal(x.tokens, y.tokens)


def test_shar_validation_counts_duplicates_across_shards(tmp_path):
    cuts = list(make_tiny_cuts(tmp_path / "src", n=3, seed=0))
    export_shar(CutSet.from_cuts(cuts), tmp_path / "a", shard_size=2)
    export_shar(CutSet.from_cuts([cuts[0]]), tmp_path / "b", shard_size=2)
    for f in (tmp_path / "b").iterdir():  # append the duplicate as shard 2
        f.rename(tmp_path / "a" / f.name.replace("000000", "000002"))
    accepted, report = load_validated_shar(tmp_path / "a", chunk=2)
    assert report.counts["duplicate_id"] == 1 and report.accepted == 3
    assert [c.id for c in accepted] == [c.id for c in cuts]
    assert [c.id for c in accepted] == [c.id for c in cuts]  # again: a second epoch


def test_only_local_directories_are_read(tmp_path):
    with pytest.raises(UserError, match="local directory"):
        open_shar("pipe:curl http://example.com/shard")
    with pytest.raises(UserError, match="not a Shar directory"):
        open_shar(tmp_path)
