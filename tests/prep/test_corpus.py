import gzip
import hashlib
import json
import re
import statistics

import numpy as np
import pytest
import soundfile as sf

from speedasr.cli import main as cli_main
from speedasr.data.manifests import load_cuts, validate_cuts
from speedasr.errors import UserError
from speedasr.prep.corpus import plan_corpus, plan_utterance, synthesize_corpus
from speedasr.prep.sentences import vocabulary
from speedasr.testing import make_metadata_cuts, make_tiny_cuts

TINY = dict(hours=0.003, min_eval_utterances=3, workers=1, progress=False)


def _manifest_digest(out_dir) -> str:
    """Hash of the three manifests with the output directory replaced by a placeholder."""
    digest = hashlib.sha256()
    for split in ("train", "dev", "test"):
        with gzip.open(out_dir / f"{split}_cuts.jsonl.gz", "rt") as f:
            digest.update(f.read().replace(str(out_dir.resolve()), "DIR").encode())
    return digest.hexdigest()


def _audio_digest(out_dir) -> str:
    digest = hashlib.sha256()
    for path in sorted((out_dir / "audio").rglob("*.flac")):
        digest.update(sf.read(path, dtype="int16")[0].tobytes())
    return digest.hexdigest()


def test_planner_length_distribution():
    plans = [plan_utterance(0, "train", i) for i in range(3000)]
    durations = np.array([p.estimated_duration for p in plans])
    assert 4.5 <= np.median(durations) <= 7.5
    assert 13 <= np.percentile(durations, 95) <= 21
    assert durations.max() <= 30
    assert (durations < 1.5).sum() >= 5


def test_planner_texts_voices_and_prosody_vary():
    plans = [plan_utterance(3, "dev", i) for i in range(300)]
    vocab = set(vocabulary())
    assert 300 <= len(vocab) <= 1500
    for p in plans:
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", p.text), p.text
        assert set(p.text.split()) <= vocab
        assert 140 <= p.rate <= 220
    assert len({p.voice for p in plans}) >= 30
    assert len({p.voice.split("+")[0] for p in plans}) >= 4
    assert len({p.pitch for p in plans}) >= 20
    assert len({w for p in plans for w in p.text.split()}) >= 400


def test_plans_are_deterministic_per_seed():
    a, b, c = plan_corpus(0.05, seed=1), plan_corpus(0.05, seed=1), plan_corpus(0.05, seed=2)
    assert a == b
    assert [p.text for p in a["train"]] != [p.text for p in c["train"]]
    assert len(a["dev"]) == len(a["test"]) == 50  # at least 50 even for tiny corpora


def test_synthesis_is_deterministic_and_matches_manifests(tmp_path):
    one = synthesize_corpus(tmp_path / "one", seed=5, **TINY)
    synthesize_corpus(tmp_path / "two", seed=5, **TINY)
    synthesize_corpus(tmp_path / "other", seed=6, **TINY)
    assert _manifest_digest(tmp_path / "one") == _manifest_digest(tmp_path / "two")
    assert _audio_digest(tmp_path / "one") == _audio_digest(tmp_path / "two")
    assert _manifest_digest(tmp_path / "one") != _manifest_digest(tmp_path / "other")
    assert one["stats"]["splits"]["dev"]["utterances"] == 3
    assert sum(s["utterances"] for s in one["stats"]["splits"].values()) == len(
        list((tmp_path / "one" / "audio").rglob("*.flac"))
    )

    for split in ("train", "dev", "test"):
        cuts = load_cuts(one[split])
        for cut in cuts:
            info = sf.info(cut.recording.sources[0].source)
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert info.frames == cut.recording.num_samples
            assert cut.duration == info.frames / 16000 == cut.supervisions[0].duration
            assert cut.supervisions[0].language == "en" and "+" in cut.supervisions[0].speaker
        accepted, report = validate_cuts(cuts, check_audio="full")
        assert report.rejected == 0


def test_rerun_is_skipped_and_parameter_changes_need_overwrite(tmp_path, capsys):
    out = tmp_path / "corpus"
    first = synthesize_corpus(out, seed=0, **TINY)
    mtime = (out / "train_cuts.jsonl.gz").stat().st_mtime_ns
    again = synthesize_corpus(out, seed=0, **{**TINY, "progress": True})
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train_cuts.jsonl.gz").stat().st_mtime_ns == mtime
    assert again["stats"] == json.loads((out / "corpus.json").read_text())["stats"]
    assert again["train"] == first["train"]
    with pytest.raises(UserError, match="other parameters"):
        synthesize_corpus(out, seed=1, **TINY)
    replaced = synthesize_corpus(out, seed=1, overwrite=True, **TINY)
    assert json.loads((out / "corpus.json").read_text())["params"]["seed"] == 1
    assert replaced["stats"]["all"]["utterances"] == len(list((out / "audio").rglob("*.flac")))


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--hours"):
        synthesize_corpus(tmp_path / "x", hours=0)
    with pytest.raises(UserError, match="--hours"):
        synthesize_corpus(tmp_path / "x", hours=float("nan"))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write to output directory"):
        synthesize_corpus(blocker / "corpus", **TINY)
    assert cli_main(["data", "synth", "--out", str(tmp_path / "y"), "--hours", "-1"]) == 2


def test_worker_pool_gives_the_same_corpus(tmp_path):
    synthesize_corpus(tmp_path / "serial", seed=9, **TINY)
    synthesize_corpus(tmp_path / "pool", seed=9, **{**TINY, "workers": 2})
    assert _manifest_digest(tmp_path / "serial") == _manifest_digest(tmp_path / "pool")
    assert _audio_digest(tmp_path / "serial") == _audio_digest(tmp_path / "pool")


def test_testing_helpers(tmp_path):
    tones = make_tiny_cuts(tmp_path / "tones", n=3, seed=0)
    assert len(load_cuts(tmp_path / "tones" / "cuts.jsonl.gz")) == 3
    assert all(0.5 <= c.duration <= 2.0 and c.supervisions[0].text for c in tones)
    speech = make_tiny_cuts(tmp_path / "speech", n=2, seed=0, speech=True, audio_format="wav")
    assert all(c.load_audio().shape[0] == 1 for c in speech)
    meta = make_metadata_cuts(200, seed=0)
    assert len(meta) == 200 and 4 < statistics.median(c.duration for c in meta) < 8
    assert meta[0].supervisions[0].text == make_metadata_cuts(1, seed=0)[0].supervisions[0].text


def test_documented_old_path_still_imports():
    from speedasr.data.corpus import synthesize_corpus as old

    assert old is synthesize_corpus
