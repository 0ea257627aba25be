import gzip
import json
import sys

import numpy as np
import pytest
import soundfile as sf
from lhotse import AudioSource, CutSet, MonoCut, Recording
from lhotse.utils import fastcopy

from speedasr.cli import main as cli_main
from speedasr.data.manifests import REASONS, load_cuts, validate_cuts
from speedasr.errors import UserError
from speedasr.testing import OTHER_RATE_AUDIO, make_bad_input_cuts, make_tiny_cuts


def _with_recording(cut, new_id, path, sampling_rate=16000, num_samples=None, source_type="file"):
    """A copy of `cut` (same text) named `new_id`, whose recording points at `path`."""
    num_samples = num_samples or cut.recording.num_samples
    recording = Recording(
        id=new_id,
        sources=[AudioSource(type=source_type, channels=[0], source=str(path))],
        sampling_rate=sampling_rate,
        num_samples=num_samples,
        duration=num_samples / sampling_rate,
    )
    duration = recording.duration
    supervision = cut.supervisions[0].with_offset(0.0)
    supervision = fastcopy(supervision, id=new_id, recording_id=new_id, duration=duration)
    return MonoCut(
        id=new_id,
        start=0.0,
        duration=duration,
        channel=0,
        recording=recording,
        supervisions=[supervision],
    )


@pytest.fixture
def seeded_cuts(tmp_path):
    """Three good cuts, then one cut of each bad class (expected reason in cut.custom)."""
    good = list(make_tiny_cuts(tmp_path / "good", n=3, seed=1, audio_format="wav"))
    base = good[0]
    n = base.recording.num_samples
    marker = tmp_path / "MARKER"
    bad = {}

    bad["missing_audio"] = _with_recording(base, "missing", tmp_path / "nope.wav")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    bad["corrupt_audio"] = _with_recording(base, "corrupt", corrupt)
    bad["bad_duration"] = fastcopy(base, id="zero", duration=0.0)
    empty = base.with_id("empty")
    empty.supervisions = [empty.supervisions[0].transform_text(lambda t: "  ")]
    bad["empty_text"] = empty
    nosup = base.with_id("nosup")
    nosup.supervisions = []
    bad["no_supervision"] = nosup
    long_path = tmp_path / "long.wav"
    sf.write(long_path, np.zeros(16000 * 3, dtype=np.float32), 16000)
    bad["too_long"] = _with_recording(base, "long", long_path, num_samples=16000 * 3)
    nan_path = tmp_path / "nan.wav"
    nan_audio = np.full(n, 0.1, dtype=np.float32)
    nan_audio[10] = np.nan
    sf.write(nan_path, nan_audio, 16000, subtype="FLOAT")
    bad["non_finite_samples"] = _with_recording(base, "nan", nan_path)
    sr_path = tmp_path / "sr8k.wav"
    sf.write(sr_path, np.zeros(n, dtype=np.float32), 8000)
    bad["header_mismatch"] = _with_recording(base, "sr", sr_path)
    bad["duplicate_id"] = good[1]
    good_path = base.recording.sources[0].source
    bad["command_source"] = _with_recording(
        base, "cmd", f"touch {marker}; cat {good_path}", source_type="command"
    )
    pipe = _with_recording(base, "pipe", f"pipe:touch {marker}; cat {good_path}", source_type="url")
    cuts = CutSet.from_cuts(good + list(bad.values()) + [pipe])
    return cuts, bad, good, marker


def test_each_bad_class_is_rejected_with_its_reason(seeded_cuts, tmp_path):
    cuts, bad, good, marker = seeded_cuts
    accepted, report = validate_cuts(cuts, max_duration=2.5, check_audio="full")
    assert sorted(c.id for c in accepted) == sorted(c.id for c in good)
    assert report.total == len(cuts) and report.accepted == 3
    by_id = {r.cut_id: r.reason for r in report.rejects}
    for reason, cut in bad.items():
        if reason == "duplicate_id":
            assert [r.reason for r in report.rejects if r.cut_id == cut.id] == ["duplicate_id"]
        else:
            assert by_id[cut.id] == reason, (cut.id, report.rejects)
    assert by_id["pipe"] == "command_source"
    assert report.counts["command_source"] == 2
    assert sum(report.counts.values()) == report.rejected == len(bad) + 1
    assert set(report.counts) <= set(REASONS)
    assert not marker.exists(), "validation executed a command source"

    out = tmp_path / "report" / "rejects.jsonl"
    report.write(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == report.rejected
    assert {r["reason"] for r in rows} == set(bad)
    assert all(r["cut_id"] and r["detail"] for r in rows)
    assert "accepted 3" in report.summary() and "missing_audio 1" in report.summary()


def test_header_mode_skips_decoding_and_none_mode_skips_audio(seeded_cuts):
    cuts, bad, good, marker = seeded_cuts
    _, header = validate_cuts(cuts, max_duration=2.5)
    assert header.check_audio == "header"
    assert header.counts["non_finite_samples"] == 0  # NaNs need check_audio="full"
    assert header.counts["missing_audio"] == header.counts["header_mismatch"] == 1
    _, meta = validate_cuts(cuts, max_duration=2.5, check_audio=False)
    assert meta.counts["missing_audio"] == meta.counts["corrupt_audio"] == 0
    assert meta.counts["too_long"] == meta.counts["command_source"] - 1 == 1
    assert not marker.exists()


def test_allowed_command_sources_are_accepted_but_never_run(seeded_cuts):
    cuts, bad, good, marker = seeded_cuts
    accepted, report = validate_cuts(cuts, check_audio="full", allow_command_sources=True)
    assert {"cmd", "pipe"} <= {c.id for c in accepted}
    assert report.unchecked_audio == 2
    assert not marker.exists()


def test_load_cuts_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_cuts(tmp_path / "missing.jsonl.gz")
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="not a readable lhotse cut manifest"):
        load_cuts(garbage)
    not_cuts = tmp_path / "not_cuts.jsonl"
    not_cuts.write_text('{"hello": 1}\n')
    with pytest.raises(UserError, match="not a readable"):
        load_cuts(not_cuts)
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt"):
        pass
    with pytest.raises(UserError, match="no cuts"):
        load_cuts(empty)


@pytest.mark.parametrize("name", ["manifest.json", "manifest.json.gz"])
def test_load_cuts_names_the_importer_for_a_nemo_manifest(tmp_path, name):
    path = tmp_path / name
    line = {"audio_filepath": "a.wav", "duration": 1.0, "answer": "hi", "target_lang": "en"}
    with (gzip.open if name.endswith(".gz") else open)(path, "wt") as f:
        f.write(json.dumps(line) + "\n")
    with pytest.raises(UserError) as e:
        load_cuts(path)
    assert str(e.value) == (
        f"cuts file '{path}' is a NeMo manifest (lines with 'audio_filepath'), not a lhotse cut "
        f"manifest: convert it with 'speedasr data import --format nemo --in {path} --out "
        "CUTS.jsonl.gz'"
    )


def test_cli_writes_report_and_accepted_cuts(seeded_cuts, tmp_path, capsys):
    cuts, bad, good, marker = seeded_cuts
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    report, accepted = tmp_path / "rejects.jsonl", tmp_path / "accepted.jsonl.gz"
    argv = ["data", "validate", "--cuts", str(path), "--out", str(report)]
    code = cli_main(
        argv + ["--max-duration", "2.5", "--check-audio", "full", "--accepted", str(accepted)]
    )
    assert code == 0
    assert len(report.read_text().splitlines()) == len(bad) + 1
    assert len(load_cuts(accepted)) == 3
    assert "Validated" in capsys.readouterr().out
    assert cli_main(["data", "validate", "--cuts", str(tmp_path / "x.jsonl.gz"), "--out", "r"]) == 2
    assert not marker.exists()


def test_full_check_loads_any_rate_and_names_every_bad_cut(tmp_path):
    cuts, expected = make_bad_input_cuts(tmp_path)
    accepted, report = validate_cuts(cuts, max_duration=2.0, check_audio="full")
    assert {r.cut_id: r.reason for r in report.rejects} == expected
    other_rates = {f"rate{rate}-{ch}ch" for rate, ch, _ in OTHER_RATE_AUDIO}
    assert other_rates <= {c.id for c in accepted}  # resampled when loaded, never rejected
    assert report.converted == len(other_rates)
    assert "3 accepted cuts are not 16 kHz mono" in report.summary()
    assert not (tmp_path / "EXECUTED").exists()


def test_full_check_rejects_audio_that_cannot_be_resampled(tmp_path, monkeypatch):
    cuts, _ = make_bad_input_cuts(tmp_path, n_good=1)
    good = CutSet.from_cuts(list(cuts)[: 1 + len(OTHER_RATE_AUDIO)])  # the good cuts come first
    monkeypatch.setitem(sys.modules, "scipy", None)  # lhotse's resampling backend is missing
    accepted, report = validate_cuts(good, check_audio="full")
    assert [c.id for c in accepted] == ["good-0"]
    assert report.counts["corrupt_audio"] == len(OTHER_RATE_AUDIO)
    assert all("scipy" in r.detail for r in report.rejects)


def test_audio_to_transcribe_needs_no_text(tmp_path):
    cuts, expected = make_bad_input_cuts(tmp_path)
    _, report = validate_cuts(cuts, check_audio="header", require_text=False)
    assert "empty-text" not in {r.cut_id for r in report.rejects}
    assert report.counts["empty_text"] == 0 and report.counts["missing_audio"] == 1
