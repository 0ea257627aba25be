"""Import other manifest formats as lhotse cutsets.

`speedasr data import --format {nemo,tsv} --in FILE --out CUTS.jsonl.gz [--language en]`

* ``nemo``: NeMo JSON-lines manifests, one ``{"audio_filepath", "duration", "text"}`` object per
  line, optionally ``"offset"`` (seconds) and ``"lang"``. Canary-style lines are read too: the
  transcript in ``"answer"`` (which wins over ``"text"``, as NeMo's Canary configs read
  ``text_field: answer``), the language in ``"target_lang"`` (their ``lang_field``; it wins over
  ``"lang"``, then ``"source_lang"``, then ``--language``), and ``"taskname"``/``"task"``,
  ``"pnc"``. Lines asking for speech translation (a translation task, or source and target
  languages that differ) are bad lines: speedasr transcribes; so are lines whose ``pnc`` is not
  one of NeMo's values (yes/no, true/false, 1/0). Every field the importer does not consume is
  kept in ``cut.custom`` (NeMo's lhotse reader does the same), so ``pnc`` (which the prompt of an
  imported Canary model follows), ``source_lang``, ``target_lang``, ``taskname`` survive.
  Relative paths are resolved against the manifest's folder. Recordings are built from each file's
  header (the file must exist); with ``--no-audio-check`` they are built from the manifest alone
  (assumed ``--sampling-rate``, 16 kHz by default, and length offset + duration), never touching
  audio.
* ``tsv``: length profiles (``utt_id<TAB>duration_seconds<TAB>text`` with a header line, plain or
  gzipped, no quoting) as in ../shared/data/real_lengths. They have no audio: each cut gets a
  metadata-only recording (16 kHz, ``round(duration * 16000)`` samples) whose source is a path that
  never exists, so batching benchmarks work and any attempt to load audio fails loudly.

Bad lines are counted and reported with their line numbers, never silently dropped; an input
without a single good line is a `UserError`.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.data.manifests import metadata_only_cut
from speedasr.data.nemo_tokenizer import pnc_flag
from speedasr.errors import UserError

logger = logging.getLogger(__name__)

TSV_HEADER = ("utt_id", "duration_seconds", "text")


@dataclass
class ImportReport:
    """Lines read, cuts made, and the bad lines as (line number, problem)."""

    path: str
    lines: int = 0
    cuts: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    def bad(self, line_no: int, problem: str) -> None:
        self.bad_lines.append((line_no, problem))

    def summary(self, max_listed: int = 10) -> str:
        text = f"{self.path}: {self.cuts} cuts from {self.lines} lines"
        if not self.bad_lines:
            return text + ", no bad lines"
        listed = "; ".join(f"line {n}: {p}" for n, p in self.bad_lines[:max_listed])
        more = len(self.bad_lines) - max_listed
        listed += f"; and {more} more" if more > 0 else ""
        return text + f", {len(self.bad_lines)} bad lines skipped ({listed})"


def _open_text(path: Path):
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _check_input(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file '{path}' does not exist")
    return path


def _positive_seconds(value) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


# ---------------------------------------------------------------------------------------------
# TSV length profiles
# ---------------------------------------------------------------------------------------------


def import_tsv(path: str | Path, language: str | None = "en"):
    """Metadata-only cuts from a ``utt_id<TAB>duration_seconds<TAB>text`` file.

    Returns ``(CutSet, ImportReport)``. Texts are kept exactly as in the file.
    """
    from lhotse import CutSet

    path = _check_input(path)
    report = ImportReport(str(path))
    cuts, seen = [], set()
    try:
        with _open_text(path) as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            for line_no, row in enumerate(rows, start=1):
                if line_no == 1 and tuple(c.strip().lower() for c in row) == TSV_HEADER:
                    continue
                report.lines += 1
                if not row or row == [""]:
                    report.bad(line_no, "empty line")
                    continue
                if len(row) != 3:
                    report.bad(line_no, f"expected 3 tab-separated fields, got {len(row)}")
                    continue
                utt_id, duration, text = row[0].strip(), _positive_seconds(row[1]), row[2]
                if not utt_id:
                    report.bad(line_no, "empty utt_id")
                elif duration is None:
                    report.bad(line_no, f"duration {row[1]!r} is not a positive number")
                elif not text.strip():
                    report.bad(line_no, "empty text")
                elif utt_id in seen:
                    report.bad(line_no, f"duplicate utt_id {utt_id!r}")
                else:
                    seen.add(utt_id)
                    cuts.append(metadata_only_cut(utt_id, duration, text, language))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read TSV file '{path}': {e}") from None
    report.cuts = len(cuts)
    if not cuts:
        raise UserError(f"TSV file '{path}' has no usable lines ({report.summary()})")
    return CutSet.from_cuts(cuts), report


def cuts_from_tsv(path: str | Path, language: str | None = "en"):
    """`import_tsv` returning only the CutSet; bad lines are logged as a warning."""
    cuts, report = import_tsv(path, language=language)
    if report.bad_lines:
        logger.warning(report.summary())
    return cuts


# ---------------------------------------------------------------------------------------------
# NeMo JSON-lines manifests
# ---------------------------------------------------------------------------------------------


def _recording_id(audio: Path, root: Path, taken: dict[str, Path]) -> str:
    """Readable id from the path under the manifest's folder; a hash suffix on collisions."""
    try:
        rel = audio.relative_to(root)
    except ValueError:
        rel = Path(audio.name)
    rec_id = str(rel.with_suffix("")).replace("/", "_")
    if taken.setdefault(rec_id, audio) != audio:
        rec_id += "-" + hashlib.sha1(str(audio).encode()).hexdigest()[:8]
        taken[rec_id] = audio
    return rec_id


# Canary's task names (NeMo's prompt formatter accepts these spellings), by what they ask for.
NEMO_TRANSCRIPTION_TASKS = ("asr", "transcribe", "<|transcribe|>")
NEMO_TRANSLATION_TASKS = ("ast", "translate", "s2t_translation", "<|translate|>")
# Fields the importer turns into the cut itself; every other field of a line goes to cut.custom.
NEMO_CUT_FIELDS = ("audio_filepath", "duration", "offset")


def _language_code(value) -> str | None:
    """``"en"`` from ``"en"`` or Canary's special-token spelling ``"<|en|>"``; None if absent."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if value.startswith("<|") and value.endswith("|>"):
        value = value[2:-2]
    return value


def _nemo_text_and_language(item: dict, default_language: str | None) -> tuple[str, str, str]:
    """``(text field, text, language)`` of a NeMo or Canary line; ValueError names what is wrong."""
    text_field = "answer" if "answer" in item else "text"
    text = item.get(text_field)
    if not isinstance(text, str) or not text.strip():
        other = " (nor Canary's 'answer')" if text_field == "text" else ""
        raise ValueError(f"missing or empty '{text_field}'{other}")
    task = item.get("taskname", item.get("task"))
    if task is not None and task not in NEMO_TRANSCRIPTION_TASKS:
        if task in NEMO_TRANSLATION_TASKS:
            raise ValueError(f"task {task!r} is speech translation; speedasr only transcribes")
        known = ", ".join(NEMO_TRANSCRIPTION_TASKS + NEMO_TRANSLATION_TASKS)
        raise ValueError(f"unknown task {task!r} (Canary's tasks: {known})")
    source, target = (
        _language_code(item.get("source_lang")),
        _language_code(item.get("target_lang")),
    )
    if source and target and source != target:
        raise ValueError(
            f"source_lang {source!r} and target_lang {target!r} ask for speech translation; "
            "speedasr only transcribes"
        )
    if "pnc" in item:
        pnc_flag(item["pnc"])  # a value NeMo's prompt refuses is a bad line, not a late error
    language = target or _language_code(item.get("lang")) or source or default_language
    return text_field, text, language


def import_nemo(
    path: str | Path,
    language: str | None = "en",
    check_audio: bool = True,
    sampling_rate: int = SAMPLE_RATE,
):
    """Cuts from a NeMo JSON-lines manifest. Returns ``(CutSet, ImportReport)``.

    check_audio: build recordings from file headers (missing/unreadable files are bad lines);
    when False, from the manifest alone with `sampling_rate`, reading no audio. Cut ids are the
    recording id, with ``-<start>-<end>`` (centiseconds) appended when the line has an offset.
    Canary-style lines (``answer``, ``target_lang``...): see the module docstring.
    """
    from lhotse import AudioSource, CutSet, MonoCut, Recording, SupervisionSegment

    path = _check_input(path)
    root = path.parent.resolve()
    report = ImportReport(str(path))
    cuts, seen_cuts = [], set()
    recordings: dict[Path, Recording] = {}
    taken: dict[str, Path] = {}
    try:
        f = _open_text(path)
        lines = list(f)
        f.close()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read NeMo manifest '{path}': {e}") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            item = json.loads(line)
        except ValueError as e:
            report.bad(line_no, f"invalid JSON ({e.msg})")
            continue
        if not isinstance(item, dict):
            report.bad(line_no, "not a JSON object")
            continue
        audio_field = item.get("audio_filepath")
        duration = _positive_seconds(item.get("duration"))
        offset = item.get("offset", 0.0) or 0.0
        if not isinstance(audio_field, str) or not audio_field:
            report.bad(line_no, "missing 'audio_filepath'")
            continue
        if duration is None:
            report.bad(line_no, f"'duration' {item.get('duration')!r} is not a positive number")
            continue
        try:
            text_field, text, lang = _nemo_text_and_language(item, language)
        except ValueError as e:
            report.bad(line_no, str(e))
            continue
        if not (isinstance(offset, (int, float)) and math.isfinite(offset) and offset >= 0):
            report.bad(line_no, f"'offset' {offset!r} is not a non-negative number")
            continue
        audio = Path(audio_field).expanduser()
        audio = (audio if audio.is_absolute() else root / audio).resolve()
        recording = recordings.get(audio)
        if recording is None:
            rec_id = _recording_id(audio, root, taken)
            if check_audio:
                if not audio.is_file():
                    report.bad(line_no, f"audio file '{audio}' does not exist")
                    continue
                try:
                    recording = Recording.from_file(audio, recording_id=rec_id)
                except Exception as e:
                    report.bad(line_no, f"cannot read audio '{audio}': {type(e).__name__}")
                    continue
            else:
                # Metadata only: the recording is as long as the furthest segment seen so far.
                recording = Recording(
                    id=rec_id,
                    sources=[AudioSource(type="file", channels=[0], source=str(audio))],
                    sampling_rate=sampling_rate,
                    num_samples=0,
                    duration=0.0,
                )
            recordings[audio] = recording
        end = offset + duration
        if check_audio and end > recording.duration + 0.025:
            report.bad(line_no, f"segment ends at {end:.3f} s, audio is {recording.duration} s")
            continue
        if check_audio:
            duration = min(duration, recording.duration - offset)
        cut_id = recording.id
        if "offset" in item:
            cut_id += f"-{round(offset * 100):07d}-{round(end * 100):07d}"
        if cut_id in seen_cuts:
            report.bad(line_no, f"duplicate entry (cut id {cut_id!r})")
            continue
        seen_cuts.add(cut_id)
        custom = {k: v for k, v in item.items() if k not in (*NEMO_CUT_FIELDS, text_field)}
        supervision = SupervisionSegment(
            id=cut_id,
            recording_id=recording.id,
            start=0.0,
            duration=duration,
            channel=0,
            text=text,
            language=lang,
        )
        cut = MonoCut(
            id=cut_id,
            start=offset,
            duration=duration,
            channel=0,
            recording=recording,
            supervisions=[supervision],
            custom=custom or None,
        )
        cuts.append(cut)
    if not check_audio:
        _extend_metadata_recordings(cuts, sampling_rate)
    report.cuts = len(cuts)
    if not cuts:
        raise UserError(f"NeMo manifest '{path}' has no usable lines ({report.summary()})")
    return CutSet.from_cuts(cuts), report


def _extend_metadata_recordings(cuts: list, sampling_rate: int) -> None:
    """Set each metadata-only recording's length to the end of its furthest segment."""
    recordings = {cut.recording.id: cut.recording for cut in cuts}
    ends: dict[str, float] = {}
    for cut in cuts:
        ends[cut.recording.id] = max(ends.get(cut.recording.id, 0.0), cut.end)
    for rec_id, recording in recordings.items():
        # round() first: 2.5 s * 16000 must not become 40001 samples through float error.
        recording.num_samples = math.ceil(round(ends[rec_id] * sampling_rate, 6))
        recording.duration = recording.num_samples / sampling_rate


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=("nemo", "tsv"), help="input format")
    parser.add_argument("--in", dest="input", required=True, help="input manifest")
    parser.add_argument("--out", required=True, help="output cut manifest (.jsonl.gz)")
    parser.add_argument(
        "--language",
        default="en",
        help="language of the texts (NeMo 'target_lang', 'lang', 'source_lang' fields win)",
    )
    parser.add_argument(
        "--no-audio-check",
        action="store_true",
        help="nemo: build recordings from the manifest alone, without opening audio files",
    )
    parser.add_argument(
        "--sampling-rate",
        type=int,
        default=SAMPLE_RATE,
        help="nemo --no-audio-check: sampling rate assumed for the audio (default %(default)s)",
    )
    parser.add_argument("--rejects", default=None, help="write bad lines here (JSON lines)")


def run(args: argparse.Namespace) -> int:
    if args.format == "tsv":
        cuts, report = import_tsv(args.input, language=args.language)
    else:
        cuts, report = import_nemo(
            args.input,
            language=args.language,
            check_audio=not args.no_audio_check,
            sampling_rate=args.sampling_rate,
        )
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cuts.to_file(out)
        if args.rejects:
            with open(args.rejects, "w") as f:
                for line_no, problem in report.bad_lines:
                    f.write(json.dumps({"line": line_no, "problem": problem}) + "\n")
    except OSError as e:
        raise UserError(f"cannot write '{e.filename or out}': {e.strerror or e}") from None
    print(report.summary())
    hours = sum(c.duration for c in cuts) / 3600
    print(f"wrote {len(cuts)} cuts ({hours:.2f} h) to {out}")
    return 0
