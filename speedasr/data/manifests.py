"""Load and validate lhotse cutsets; `speedasr data validate --cuts CUTS --out REJECTS.jsonl`.

Validation keeps every cut accounted for: each cut is either accepted or rejected with exactly one
reason (the first check it fails, in the order of `REASONS`), and the rejects go to a JSON-lines
report. Checks, cheapest first:

* metadata (always): duplicate cut id, unsafe audio source, duration, supervision text, maximum
  duration;
* ``check_audio="header"`` (the default, ``True``): every file/in-memory audio source is opened
  and its header read with soundfile (lhotse's backends as a fallback for other formats): missing
  file, unreadable file, and sampling rate / length / channels disagreeing with the manifest.
  Reads a few KB per file, cached per file, so long recordings cut into segments are opened once;
* ``check_audio="full"``: additionally loads each cut's samples as the model hears them (16 kHz
  mono, through ``speedasr.data.audio.load_model_audio``: cost, reading and resampling all the
  audio) and rejects what cannot be loaded that way and NaN/inf samples;
* ``check_audio=False`` (``"none"``): metadata only, audio is never touched.

Audio at another sampling rate or with several channels is not rejected: every command resamples
it to 16 kHz and averages its channels when it loads it. The report counts such accepted cuts
(``converted``) and the summary says so.

Security rule: a recording source of type ``command``, or a ``url`` starting with ``pipe:``, is a
shell command that lhotse would run to load the audio. Such cuts are rejected (``command_source``)
unless ``allow_command_sources=True``, and validation never executes them, in any mode: with the
flag they are accepted without audio checks (counted as unchecked). Remote URLs are not fetched
either (unchecked).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.data.audio import AudioLoadError, cut_recordings, load_model_audio, one_line
from speedasr.errors import UserError

# Rejection reasons, in the order they are checked.
REASONS = (
    "duplicate_id",  # a cut id seen earlier in the cutset (the first one is kept)
    "command_source",  # audio source would execute a shell command (type command / pipe: url)
    "bad_duration",  # cut duration zero, negative, NaN or inf
    "out_of_bounds",  # cut extends past the end of its recording
    "no_supervision",  # no supervision segment
    "empty_text",  # supervisions exist but none has non-blank text
    "too_long",  # duration above max_duration
    "missing_audio",  # audio file does not exist
    "corrupt_audio",  # audio header or samples cannot be read
    "header_mismatch",  # file's sampling rate / length / channels disagree with the manifest
    "non_finite_samples",  # decoded samples contain NaN or inf (check_audio="full")
)

# Same slack as lhotse's LHOTSE_AUDIO_DURATION_MISMATCH_TOLERANCE default: manifests written by
# other tools may round durations.
LENGTH_TOLERANCE_SECONDS = 0.025

CheckAudio = bool | Literal["none", "header", "full"]


# Source path of metadata-only recordings: a relative path that is never created by anything.
METADATA_ONLY_PREFIX = "<metadata-only: no audio>/"
METADATA_ONLY_SOURCE = METADATA_ONLY_PREFIX + "{id}"


def metadata_only_cut(cut_id: str, duration: float, text: str, language: str | None, **custom):
    """A MonoCut whose recording has no audio: for benchmarks and tests that need only durations
    and texts. Loading its audio raises (the source path never exists)."""
    from lhotse import AudioSource, MonoCut, Recording, SupervisionSegment

    num_samples = round(duration * SAMPLE_RATE)
    duration = num_samples / SAMPLE_RATE
    source = AudioSource(type="file", channels=[0], source=METADATA_ONLY_SOURCE.format(id=cut_id))
    recording = Recording(
        id=cut_id,
        sources=[source],
        sampling_rate=SAMPLE_RATE,
        num_samples=num_samples,
        duration=duration,
    )
    supervision = SupervisionSegment(
        id=cut_id,
        recording_id=cut_id,
        start=0.0,
        duration=duration,
        channel=0,
        text=text,
        language=language,
        custom=custom or None,
    )
    return MonoCut(
        id=cut_id,
        start=0.0,
        duration=duration,
        channel=0,
        recording=recording,
        supervisions=[supervision],
    )


def load_cuts(path: str | Path):
    """Load a lhotse cut manifest (``.jsonl``, ``.jsonl.gz``, ``.json``...) eagerly.

    Raises `UserError` if the file is missing, unreadable, not a cut manifest, or empty.
    """
    from lhotse import CutSet

    path = Path(path)
    if not path.exists():
        raise UserError(f"cuts file '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"cuts file '{path}' is a directory; expected a .jsonl.gz cut manifest")
    try:
        cuts = CutSet.from_file(path)  # None for an empty file
        cuts = CutSet() if cuts is None else cuts.to_eager()
    except Exception as e:  # lhotse raises anything from gzip/json/KeyError/ValueError
        if _is_nemo_manifest(path):
            raise UserError(
                f"cuts file '{path}' is a NeMo manifest (lines with 'audio_filepath'), not a lhotse"
                f" cut manifest: convert it with 'speedasr data import --format nemo --in {path}"
                " --out CUTS.jsonl.gz'"
            ) from None
        detail = f"{type(e).__name__}: {e}".strip()[:300]
        raise UserError(
            f"cuts file '{path}' is not a readable lhotse cut manifest ({detail})"
        ) from None
    if len(cuts) == 0:
        raise UserError(f"cuts file '{path}' contains no cuts")
    return cuts


def _is_nemo_manifest(path: Path) -> bool:
    """Whether the first line of ``path`` (plain or gzipped) is a NeMo manifest entry."""
    try:
        with path.open("rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, EOFError, ValueError):
        return False
    return isinstance(first, dict) and "audio_filepath" in first


@dataclass
class Reject:
    cut_id: str
    reason: str  # one of REASONS
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"cut_id": self.cut_id, "reason": self.reason, "detail": self.detail}


def reason_counts(rejects: list[Reject]) -> dict[str, int]:
    """Rejects per reason, in the order of `REASONS` (reasons without rejects left out)."""
    counts = Counter(r.reason for r in rejects)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def format_reason_counts(rejects: list[Reject]) -> str:
    """``"missing_audio 2, corrupt_audio 1"``: `reason_counts` for humans."""
    return ", ".join(f"{reason} {n}" for reason, n in reason_counts(rejects).items())


@dataclass
class ValidationReport:
    """Outcome of `validate_cuts`: counts per reason, the rejects, and totals (cuts and seconds)."""

    check_audio: str
    total: int = 0
    accepted: int = 0
    total_seconds: float = 0.0
    accepted_seconds: float = 0.0
    unchecked_audio: int = 0  # accepted cuts whose audio was not checked (remote/command sources)
    converted: int = 0  # accepted cuts not at 16 kHz mono: resampled / downmixed when loaded
    counts: Counter = field(default_factory=Counter)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.total - self.accepted

    def add_reject(self, cut_id: str, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.counts[reason] += 1
        self.rejects.append(Reject(cut_id, reason, detail))

    def summary(self) -> str:
        """One paragraph for humans."""
        text = (
            f"Validated {self.total} cuts ({self.total_seconds / 3600:.2f} h, audio check: "
            f"{self.check_audio}): accepted {self.accepted} ({self.accepted_seconds / 3600:.2f} h),"
            f" rejected {self.rejected}"
        )
        if self.rejected:
            reasons = ", ".join(f"{r} {self.counts[r]}" for r in REASONS if self.counts[r])
            text += f" ({reasons})"
        text += "."
        if self.unchecked_audio:
            text += (
                f" {self.unchecked_audio} accepted cuts have audio sources that were not checked"
                " (remote URLs or allowed command sources)."
            )
        if self.converted:
            text += (
                f" {self.converted} accepted cuts are not {SAMPLE_RATE / 1000:g} kHz mono: they are"
                " resampled (lhotse) and their channels averaged when loaded."
            )
        return text

    def to_dict(self) -> dict:
        return {
            "check_audio": self.check_audio,
            "total": self.total,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "total_seconds": round(self.total_seconds, 3),
            "accepted_seconds": round(self.accepted_seconds, 3),
            "unchecked_audio": self.unchecked_audio,
            "converted": self.converted,
            "counts": {r: self.counts[r] for r in REASONS if self.counts[r]},
        }

    def write(self, path: str | Path) -> None:
        """Write the rejects as JSON lines: ``{"cut_id", "reason", "detail"}``, in cutset order."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w") as f:
                for r in self.rejects:
                    f.write(json.dumps(r.to_dict()) + "\n")
        except OSError as e:
            raise UserError(f"cannot write report '{path}': {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _is_command(source) -> bool:
    if source.type == "command":
        return True
    return isinstance(source.source, str) and source.source.strip().lower().startswith("pipe:")


def _check_metadata(
    cut, max_duration: float | None, require_text: bool = True
) -> tuple[str, str] | None:
    duration = cut.duration
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        return "bad_duration", f"duration {duration!r}"
    recording = getattr(cut, "recording", None)
    if recording is not None and getattr(cut, "start", None) is not None:
        end = cut.start + duration
        if end > recording.duration + LENGTH_TOLERANCE_SECONDS:
            return "out_of_bounds", f"cut ends at {end:.3f} s, recording at {recording.duration} s"
    supervisions = cut.supervisions
    if not require_text:
        return None
    if not supervisions:
        return "no_supervision", "cut has no supervision segment"
    if not any((s.text or "").strip() for s in supervisions):
        return "empty_text", f"{len(supervisions)} supervision(s), all without text"
    if max_duration is not None and duration > max_duration:
        return "too_long", f"duration {duration:.3f} s > max {max_duration} s"
    return None


def _read_header(source):
    """soundfile's header info of a file/memory source; lhotse's backends for other formats."""
    import soundfile as sf

    target = io.BytesIO(source.source) if source.type == "memory" else source.source
    try:
        info = sf.info(target)
        return info.samplerate, info.frames, info.channels
    except Exception:
        from lhotse.audio.backend import info as lhotse_info

        if source.type == "memory":
            target = io.BytesIO(source.source)
        info = lhotse_info(target)
        return info.samplerate, info.frames, info.channels


def _check_header(recording, cache: dict) -> tuple[str, str] | None:
    for source in recording.sources:
        key = source.source if source.type == "file" else id(source)
        if key not in cache:
            if source.type == "file" and not Path(source.source).is_file():
                hint = ""
                if source.source.startswith(METADATA_ONLY_PREFIX):
                    hint = " (metadata-only cut: validate it with check_audio none)"
                cache[key] = ("missing_audio", f"no file '{source.source}'{hint}")
            else:
                try:
                    cache[key] = _read_header(source)
                except Exception as e:
                    cache[key] = ("corrupt_audio", one_line(e))
        result = cache[key]
        if isinstance(result[0], str):
            return result
        sample_rate, frames, channels = result
        name = source.source if source.type == "file" else f"{source.type} source"
        if recording.transforms:  # e.g. lhotse resampling/speed perturbation: no 1:1 header
            continue
        if sample_rate != recording.sampling_rate:
            return "header_mismatch", (
                f"'{name}' has sampling rate {sample_rate}, manifest {recording.sampling_rate}"
            )
        if abs(frames - recording.num_samples) > LENGTH_TOLERANCE_SECONDS * sample_rate:
            return "header_mismatch", (
                f"'{name}' has {frames} samples, manifest {recording.num_samples}"
            )
        if source.channels and max(source.channels) >= channels:
            return "header_mismatch", (
                f"'{name}' has {channels} channel(s), manifest uses channels {source.channels}"
            )
    return None


def _check_samples(cut) -> tuple[str, str] | None:
    """Load the cut the way training and inference do (16 kHz mono); the reason if that fails."""
    try:
        load_model_audio(cut)
    except AudioLoadError as e:
        return e.reason, e.detail
    return None


def is_model_format(cut) -> bool:
    """Whether the cut's audio is already what the model hears: 16 kHz, one channel."""
    return cut.sampling_rate == SAMPLE_RATE and getattr(cut, "num_channels", 1) == 1


def validate_cuts(
    cuts,
    max_duration: float | None = None,
    check_audio: CheckAudio = True,
    allow_command_sources: bool = False,
    progress: bool = False,
    require_text: bool = True,
):
    """Split `cuts` into accepted cuts and a `ValidationReport` (see the module docstring).

    max_duration: seconds; longer cuts are rejected (``too_long``). check_audio: ``False``/"none",
    ``True``/"header" or "full". allow_command_sources: accept (never run) command/pipe sources.
    require_text: reject cuts without a transcript (``False`` for audio to transcribe).
    Returns ``(accepted: CutSet, report: ValidationReport)``; accepted cuts keep their order.
    """
    from lhotse import CutSet

    from speedasr.console import progress_bar

    mode = {True: "header", False: "none"}.get(check_audio, check_audio)
    if mode not in ("none", "header", "full"):
        raise ValueError(f"check_audio must be a bool, 'none', 'header' or 'full', got {mode!r}")
    report = ValidationReport(check_audio=mode)
    accepted = []
    seen: set[str] = set()
    header_cache: dict = {}
    for cut in progress_bar(cuts, desc="validating", unit="cut", disable=not progress):
        report.total += 1
        duration = cut.duration if isinstance(cut.duration, (int, float)) else 0.0
        report.total_seconds += duration if math.isfinite(duration) else 0.0
        sources = [s for rec in cut_recordings(cut) for s in rec.sources]
        commands = [s for s in sources if _is_command(s)]
        if cut.id in seen:
            problem = ("duplicate_id", "cut id seen earlier in the cutset")
        elif commands and not allow_command_sources:
            problem = ("command_source", f"{commands[0].type} source {str(commands[0].source)!r}")
        else:
            problem = _check_metadata(cut, max_duration, require_text)
        seen.add(cut.id)
        checkable = not commands and all(s.type in ("file", "memory") for s in sources)
        if problem is None and mode != "none":
            if checkable:
                for recording in cut_recordings(cut):
                    problem = problem or _check_header(recording, header_cache)
                if problem is None and mode == "full":
                    problem = _check_samples(cut)
            else:
                report.unchecked_audio += 1
        if problem is None:
            accepted.append(cut)
            report.accepted += 1
            report.accepted_seconds += duration
            report.converted += not is_model_format(cut)
        else:
            report.add_reject(cut.id, *problem)
    return CutSet.from_cuts(accepted), report


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="lhotse cut manifest (.jsonl.gz)")
    parser.add_argument("--out", required=True, help="rejects report to write (JSON lines)")
    parser.add_argument("--max-duration", type=float, default=None, help="reject longer cuts (s)")
    parser.add_argument(
        "--check-audio",
        choices=("none", "header", "full"),
        default="header",
        help="none: metadata only; header (default): open each file's header; full: decode all",
    )
    parser.add_argument("--accepted", default=None, help="also write the accepted cuts here")
    parser.add_argument(
        "--allow-command-sources",
        action="store_true",
        help="accept cuts whose audio is loaded by running a shell command (never run here)",
    )


def run(args: argparse.Namespace) -> int:
    if args.max_duration is not None and not args.max_duration > 0:
        raise UserError(f"--max-duration must be positive, got {args.max_duration}")
    cuts = load_cuts(args.cuts)
    accepted, report = validate_cuts(
        cuts,
        max_duration=args.max_duration,
        check_audio=args.check_audio,
        allow_command_sources=args.allow_command_sources,
        progress=True,
    )
    report.write(args.out)
    if args.accepted:
        accepted.to_file(args.accepted)
    print(report.summary())
    print(f"rejects: {args.out}" + (f"; accepted cuts: {args.accepted}" if args.accepted else ""))
    return 0 if report.accepted else 1
