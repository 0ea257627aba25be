import gzip
import json

import pytest
from lhotse.audio.utils import AudioLoadingError

from speedasr.cli import main as cli_main
from speedasr.data.dataset import reference_and_language
from speedasr.data.manifests import load_cuts
from speedasr.errors import UserError
from speedasr.prep.importers import cuts_from_tsv, import_nemo, import_tsv
from speedasr.testing import make_tiny_cuts


def _write_tsv(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("utt_id\tduration_seconds\ttext\n")
        f.writelines(line + "\n" for line in lines)


def test_tsv_round_trip_and_bad_lines(tmp_path):
    path = tmp_path / "lengths.tsv.gz"
    _write_tsv(
        path,
        [
            'a\t3.144\tDia bilang "halo" lagi.',  # literal quotes: no CSV quoting
            "b\t0.5\tpendek",
            "c\tnot-a-number\tteks",  # line 4
            "d\t-1\tteks",  # line 5
            "e\t2.0",  # line 6: missing text
            "f\t2.0\t   ",  # line 7: blank text
            "a\t1.0\tduplicate",  # line 8
        ],
    )
    cuts, report = import_tsv(path, language="id")
    assert [c.id for c in cuts] == ["a", "b"]
    a = cuts[0]
    assert a.supervisions[0].text == 'Dia bilang "halo" lagi.'
    assert a.supervisions[0].language == "id"
    assert a.recording.sampling_rate == 16000
    assert a.recording.num_samples == round(3.144 * 16000) and a.duration == pytest.approx(3.144)
    assert [n for n, _ in report.bad_lines] == [4, 5, 6, 7, 8]
    assert report.lines == 7 and report.cuts == 2
    assert "line 4" in report.summary() and "5 bad lines" in report.summary()
    with pytest.raises(AudioLoadingError, match="metadata-only"):  # no audio behind it
        a.load_audio()
    # Serialization round trip keeps durations and texts.
    out = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(out)
    again = load_cuts(out)
    assert [(c.id, c.duration, c.supervisions[0].text) for c in again] == [
        (c.id, c.duration, c.supervisions[0].text) for c in cuts
    ]
    assert len(cuts_from_tsv(path)) == 2


def test_tsv_without_good_lines_is_a_user_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("utt_id\tduration_seconds\ttext\nx\tzero\thello\n")
    with pytest.raises(UserError, match="no usable lines.*line 2"):
        import_tsv(path)
    with pytest.raises(UserError, match="does not exist"):
        import_tsv(tmp_path / "missing.tsv")


def test_real_lengths_file_if_present():
    from pathlib import Path

    path = Path("/work/shared/data/real_lengths/wtimit_normal_dev.tsv.gz")
    if not path.exists():
        pytest.skip("shared real_lengths data not on this machine")
    cuts, report = import_tsv(path)
    assert len(cuts) == 1265 and not report.bad_lines


def _nemo_manifest(tmp_path, cuts, extra_lines=()):
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "manifest.json"
    lines = []
    for cut in cuts:
        audio = cut.recording.sources[0].source
        rel = "../" + str(audio).split(str(tmp_path) + "/", 1)[1]  # relative to the manifest
        row = {"audio_filepath": rel, "duration": cut.duration, "text": cut.supervisions[0].text}
        lines.append(json.dumps(row))
    path.write_text("\n".join(list(lines) + list(extra_lines)) + "\n")
    return path


def test_nemo_round_trip_with_audio_and_bad_lines(tmp_path):
    tiny = make_tiny_cuts(tmp_path / "tiny", n=3, seed=2)
    first = tiny[0].recording.sources[0].source
    extra = [
        "{not json",  # line 4
        json.dumps({"audio_filepath": "nope.flac", "duration": 1.0, "text": "x"}),  # 5
        json.dumps({"audio_filepath": first, "duration": 0.2, "text": "part", "offset": 0.1}),
        json.dumps({"audio_filepath": first, "duration": 0, "text": "x"}),  # 7
        json.dumps({"audio_filepath": first, "duration": 0.2, "text": ""}),  # 8
        json.dumps({"audio_filepath": first, "duration": 99.0, "text": "x", "offset": 1}),  # 9
        json.dumps({"audio_filepath": first, "duration": 0.3, "text": "de", "lang": "de"}),  # 10
    ]
    path = _nemo_manifest(tmp_path, tiny, extra)
    cuts, report = import_nemo(path, language="en")
    assert [n for n, _ in report.bad_lines] == [4, 5, 7, 8, 9, 10]  # 10: same id as line 1
    assert len(cuts) == 4
    for cut, ref in zip(cuts, tiny, strict=False):
        assert cut.supervisions[0].text == ref.supervisions[0].text
        assert cut.duration == pytest.approx(ref.duration)
        assert cut.recording.num_samples == ref.recording.num_samples
        assert cut.supervisions[0].language == "en"
    segment = cuts[3]
    assert segment.start == pytest.approx(0.1) and segment.duration == pytest.approx(0.2)
    assert segment.load_audio().shape == (1, 3200)


def test_nemo_metadata_only_reads_no_audio(tmp_path):
    path = tmp_path / "manifest.json"
    rows = [
        {"audio_filepath": "a/x.wav", "duration": 2.5, "text": "hello world", "lang": "en"},
        {"audio_filepath": "long.wav", "duration": 1.0, "offset": 3.0, "text": "later"},
        {"audio_filepath": "long.wav", "duration": 2.0, "offset": 0.0, "text": "earlier"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cuts, report = import_nemo(path, check_audio=False, language="fr")
    assert not report.bad_lines and len(cuts) == 3
    x, later, earlier = cuts
    assert x.id == "a_x" and x.recording.num_samples == 40000
    assert x.recording.sources[0].source == str((tmp_path / "a" / "x.wav").resolve())
    assert later.recording.duration == pytest.approx(4.0) == earlier.recording.duration
    assert x.supervisions[0].language == "en" and later.supervisions[0].language == "fr"


def _canary_line(audio, answer, **fields):
    """A Canary training-manifest line (NeMo's canary docs): ``answer``, languages, task, pnc."""
    row = {"audio_filepath": str(audio), "duration": 0.5, "taskname": "asr", "source_lang": "en",
           "target_lang": "en", "pnc": "yes", "answer": answer}  # fmt: skip
    return json.dumps({**row, **fields})


def test_nemo_canary_manifest(tmp_path):
    tiny = make_tiny_cuts(tmp_path / "tiny", n=2, seed=4, durations=(1.0, 1.0))
    a, b = (c.recording.sources[0].source for c in tiny)
    path = tmp_path / "canary.json"
    lines = [
        _canary_line(a, "Hello, World."),
        # answer wins over text (NeMo's canary configs read text_field: answer); the "<|de|>"
        # special-token spelling is a language too; target_lang wins over lang
        _canary_line(b, "Guten Tag.", text="guten tag", source_lang="<|de|>",
                     target_lang="<|de|>", lang="en", pnc="no", taskname="transcribe"),
        _canary_line(a, "Hallo Welt.", target_lang="de", offset=0.5),  # 3: en -> de
        _canary_line(a, "Hallo Welt.", taskname="ast", source_lang="de", target_lang="de",
                     offset=0.5),  # 4: a translation task
        _canary_line(a, "x", taskname="summarize", offset=0.5),  # 5
        _canary_line(a, " ", offset=0.5),  # 6: empty answer
        _canary_line(a, "x", pnc="maybe", offset=0.5),  # 7: NeMo's prompt refuses this pnc
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    cuts, report = import_nemo(path, language="fr")
    assert [n for n, _ in report.bad_lines] == [3, 4, 5, 6, 7]
    problems = dict(report.bad_lines)
    assert problems[7] == "pnc 'maybe' is not one of NeMo's values (yes/no, true/false, 1/0)"
    assert "source_lang 'en' and target_lang 'de' ask for speech translation" in problems[3]
    assert "task 'ast' is speech translation" in problems[4]
    assert "unknown task 'summarize'" in problems[5]
    assert problems[6] == "missing or empty 'answer'"

    path_out = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path_out)
    en, de = load_cuts(path_out)  # what training and eval read
    assert reference_and_language(en) == ("Hello, World.", "en")
    assert reference_and_language(de) == ("Guten Tag.", "de")
    assert en.custom == {"taskname": "asr", "source_lang": "en", "target_lang": "en", "pnc": "yes"}
    assert de.custom["text"] == "guten tag" and de.custom["pnc"] == "no"
    assert de.custom["lang"] == "en" and de.custom["target_lang"] == "<|de|>"
    assert en.load_audio().shape == (1, 8000)  # the line's 0.5 s of a 1 s file

    only_translation = tmp_path / "ast.json"
    only_translation.write_text(lines[3] + "\n")
    with pytest.raises(
        UserError, match="no usable lines.*line 1: task 'ast' is speech translation"
    ):
        import_nemo(only_translation)


def test_nemo_line_without_text_or_answer(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"audio_filepath": "x.wav", "duration": 1.0}) + "\n")
    with pytest.raises(
        UserError, match="line 1: missing or empty 'text' \\(nor Canary's 'answer'\\)"
    ):
        import_nemo(path, check_audio=False)


def test_cli_import(tmp_path, capsys):
    src = tmp_path / "lengths.tsv.gz"
    _write_tsv(src, ["u1\t1.5\thello there", "u2\tbad\tx"])
    out, rejects = tmp_path / "out" / "cuts.jsonl.gz", tmp_path / "rejects.jsonl"
    argv = ["data", "import", "--format", "tsv", "--in", str(src), "--out", str(out)]
    assert cli_main(argv + ["--rejects", str(rejects)]) == 0
    assert len(load_cuts(out)) == 1
    assert json.loads(rejects.read_text())["line"] == 3
    assert "1 bad lines" in capsys.readouterr().out
    argv[5] = str(tmp_path / "missing.tsv")
    assert cli_main(argv) == 2
