"""The embedded speech corpus: English sentences spoken by eSpeak NG, as lhotse manifests.

`speedasr data synth --out DIR [--hours H] [--seed N] [--workers N]` writes

    DIR/audio/{train,dev,test}/<cut id>.flac     16 kHz mono, 16-bit FLAC
    DIR/{train,dev,test}_cuts.jsonl.gz           MonoCuts, one SupervisionSegment each
    DIR/corpus.json                              parameters, counts and length statistics

Everything is a function of the seed. Each utterance gets its own random stream (seeded by seed,
split and index), which draws: a target duration from a long-tailed lognormal (median 6 s, 95th
percentile 17 s, within [0.8, 30] s), a voice (accent + eSpeak variant), a speaking rate
(140-220 words per minute), pitch and pitch range; then sentences from a small grammar over
~700 common English words (assets/corpus_words.txt) until the estimated spoken duration reaches the
target. Transcripts are lowercase words separated by single spaces; the text given to eSpeak adds
commas and full stops so that it pauses like a reader would.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.errors import UserError
from speedasr.extras import require
from speedasr.prep.sentences import SentenceGenerator

SPLITS = ("train", "dev", "test")
GENERATOR_VERSION = 1  # bump when the planner or synthesis changes the output for a given seed

# Long-tailed target durations, like read speech (LibriSpeech-like): lognormal, resampled when
# outside [0.8, 30] s. Median 6.3 s and 95th percentile 18 s before truncation; the spoken audio
# comes out ~2-4% shorter than the targets, so realized durations have median ~6 s, p95 ~17 s.
DURATION_MEDIAN = 6.3
DURATION_SIGMA = math.log(18.0 / 6.3) / 1.645
DURATION_RANGE = (0.8, 30.0)

ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
# eSpeak voice variants, 7 male and 7 female. Variants with a "breath" setting (f2, f3, f5, ...) are
# left out: their samples vary from run to run even when synthesized from a pristine engine state
# with rand() seeded (the breath filter seems to read uninitialized memory), breaking determinism.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "Annie", "linda", "belinda", "anika",
    "Andrea",
)  # fmt: skip
RATE_RANGE = (140, 220)  # eSpeak words per minute
PITCH_RANGE = (30, 70)  # eSpeak base pitch, 0..100
INTONATION_RANGE = (30, 80)  # eSpeak pitch range, 0..100

# Spoken duration estimate, fitted on 600 synthesized sentences (all voices, rates 140-220):
# seconds = (letters * A + words * B + pauses * C) * 175 / rate + D, after silence trimming.
_EST_LETTER, _EST_WORD, _EST_PAUSE, _EST_CONST = 0.0487, 0.0483, 0.0568, 0.1200
EDGE_SILENCE = 0.1  # seconds of silence kept before and after speech when trimming


# ---------------------------------------------------------------------------------------------
# Planner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UtterancePlan:
    """Everything needed to synthesize one utterance; a pure function of (seed, split, index)."""

    id: str
    split: str
    text: str  # transcript: lowercase words, single spaces, no punctuation
    spoken: str  # text given to eSpeak (with commas and full stops for pauses)
    voice: str  # eSpeak voice name, e.g. "en-us+f2"; also the speaker id
    rate: int  # words per minute
    pitch: int  # 0..100
    pitch_range: int  # 0..100
    noise_seed: int  # seeds eSpeak's noise generator (libc rand)
    target_duration: float  # seconds, drawn from the length distribution
    estimated_duration: float  # seconds, estimate for `spoken` at `rate`


def estimate_duration(spoken: str, rate: int) -> float:
    """Estimated seconds eSpeak takes to say `spoken` at `rate` words per minute, trimmed."""
    words = spoken.split()
    letters = sum(c.isalpha() for c in spoken)
    pauses = sum(w[-1] in ",." for w in words[:-1])
    units = letters * _EST_LETTER + len(words) * _EST_WORD + pauses * _EST_PAUSE
    return units * 175.0 / rate + _EST_CONST


def _target_duration(rng: random.Random) -> float:
    lo, hi = DURATION_RANGE
    while True:
        duration = rng.lognormvariate(math.log(DURATION_MEDIAN), DURATION_SIGMA)
        if lo <= duration <= hi:
            return duration


def plan_utterance(seed: int, split: str, index: int) -> UtterancePlan:
    """Draw one utterance: target duration, voice, prosody, then sentences that fill the target."""
    rng = random.Random(f"speedasr-corpus-v{GENERATOR_VERSION}-{seed}-{split}-{index}")
    target = _target_duration(rng)
    voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
    rate = rng.randint(*RATE_RANGE)
    pitch, pitch_range = rng.randint(*PITCH_RANGE), rng.randint(*INTONATION_RANGE)
    noise_seed = rng.getrandbits(31)
    generator = SentenceGenerator(rng)

    def spoken_of(sentences: list[list[str]]) -> str:
        return " ".join(" ".join(s) + "." for s in sentences)

    sentences: list[list[str]] = []
    while True:
        # Of a few candidate sentences, take a random one while the target is far away, and the
        # one that lands closest to it at the end. Short targets may pick a short phrase.
        candidates = [generator.sentence() for _ in range(6)]
        if not sentences:
            candidates += [generator.short() for _ in range(2)]
        durations = [estimate_duration(spoken_of(sentences + [c]), rate) for c in candidates]
        if max(durations) < target - 1.0:
            sentences.append(rng.choice(candidates))
            continue
        # Keep a margin below the maximum duration: the estimate is off by a few percent.
        fitting = [i for i in range(len(candidates)) if durations[i] <= 0.97 * DURATION_RANGE[1]]
        best = min(fitting, key=lambda i: abs(durations[i] - target), default=None)
        current = estimate_duration(spoken_of(sentences), rate) if sentences else 0.0
        if best is not None and (
            not sentences or abs(durations[best] - target) < abs(current - target)
        ):
            sentences.append(candidates[best])
        if sentences:
            break
    spoken = spoken_of(sentences)
    text = " ".join(w.strip(",.") for s in sentences for w in s)
    return UtterancePlan(
        id=f"{split}-{index:06d}",
        split=split,
        text=" ".join(text.split()),
        spoken=spoken,
        voice=voice,
        rate=rate,
        pitch=pitch,
        pitch_range=pitch_range,
        noise_seed=noise_seed,
        target_duration=round(target, 3),
        estimated_duration=round(estimate_duration(spoken, rate), 3),
    )


def plan_corpus(hours: float, seed: int, min_eval_utterances: int = 50) -> dict[str, list]:
    """Utterance plans per split: train until its estimated duration reaches `hours`, then dev and
    test with 5/90 of train's utterance count each, but at least `min_eval_utterances`."""
    train: list[UtterancePlan] = []
    total = 0.0
    while total < hours * 3600.0:
        train.append(plan_utterance(seed, "train", len(train)))
        total += train[-1].estimated_duration
    n_eval = max(min_eval_utterances, round(len(train) * 5 / 90))
    plans = {"train": train}
    for split in ("dev", "test"):
        plans[split] = [plan_utterance(seed, split, i) for i in range(n_eval)]
    return plans


# ---------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------


def speak(plan: UtterancePlan):
    """Synthesize `plan`: float32 samples in [-1, 1] at 16 kHz, edge silence trimmed."""
    from speedasr.prep.espeak import render

    return render(
        plan.spoken,
        plan.voice,
        plan.rate,
        plan.pitch,
        plan.pitch_range,
        noise_seed=plan.noise_seed,
        sample_rate=SAMPLE_RATE,
        margin=EDGE_SILENCE,
    )


def _synthesize_to_file(job: tuple[UtterancePlan, str]) -> int:
    """Worker task: speak the plan, write 16-bit FLAC, return the number of samples written."""
    import soundfile as sf

    plan, path = job
    audio = speak(plan)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return len(audio)


def _make_cut(plan: UtterancePlan, path: Path, num_samples: int):
    from lhotse import AudioSource, MonoCut, Recording, SupervisionSegment

    duration = num_samples / SAMPLE_RATE
    recording = Recording(
        id=plan.id,
        sources=[AudioSource(type="file", channels=[0], source=str(path))],
        sampling_rate=SAMPLE_RATE,
        num_samples=num_samples,
        duration=duration,
    )
    supervision = SupervisionSegment(
        id=plan.id,
        recording_id=plan.id,
        start=0.0,
        duration=duration,
        channel=0,
        text=plan.text,
        language="en",
        speaker=plan.voice,
        custom={"wpm": plan.rate, "pitch": plan.pitch, "pitch_range": plan.pitch_range},
    )
    return MonoCut(
        id=plan.id,
        start=0.0,
        duration=duration,
        channel=0,
        recording=recording,
        supervisions=[supervision],
    )


def duration_stats(durations: list[float]) -> dict:
    """Count, hours and median/p95/min/max seconds of a list of durations."""
    ordered = sorted(durations)
    if not ordered:
        return {"utterances": 0, "hours": 0.0}
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "utterances": len(ordered),
        "hours": round(sum(ordered) / 3600.0, 4),
        "median": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
        "under_1_5s": sum(d < 1.5 for d in ordered),
    }


def _prepare_out_dir(out: Path, params: dict, overwrite: bool) -> dict | None:
    """Return the existing corpus.json if `out` already holds this exact corpus, else make `out`
    ready for writing (raising UserError if it holds a different corpus and not `overwrite`)."""
    info_path = out / "corpus.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = {}
        complete = all((out / f"{split}_cuts.jsonl.gz").exists() for split in SPLITS)
        if info.get("params") == params and complete:
            return info
        if info and not overwrite:
            raise UserError(
                f"output directory '{out}' holds a corpus with other parameters "
                f"({info.get('params')}); choose another --out or pass --overwrite"
            )
        info_path.unlink()
    for split in SPLITS:
        (out / f"{split}_cuts.jsonl.gz").unlink(missing_ok=True)
    if overwrite and (out / "audio").is_dir():
        shutil.rmtree(out / "audio")
    return None


def synthesize_corpus(
    out_dir: str | Path,
    hours: float = 1.0,
    seed: int = 0,
    workers: int = 2,
    min_eval_utterances: int = 50,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Synthesize the corpus into `out_dir` (see the module docstring) and return
    ``{"train": path, "dev": path, "test": path, "stats": {...}}`` with the cut manifest paths.

    hours: approximate train hours (dev and test add 5/90 of its utterances each, at least
    `min_eval_utterances`). A directory that already holds the same corpus is left as it is.
    Synthesis runs in `workers` spawned processes: scripts calling this need the usual
    ``if __name__ == "__main__":`` guard.
    """
    from lhotse import CutSet

    from speedasr.console import progress_bar

    if not (isinstance(hours, (int, float)) and math.isfinite(hours) and hours > 0):
        raise UserError(f"--hours must be a positive number of hours, got {hours!r}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    require("espeakng_loader", "synthesizing the speech corpus")
    out = Path(out_dir).resolve()
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "hours": float(hours),
        "min_eval_utterances": min_eval_utterances,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory '{out}': {e.strerror or e}") from None
    existing = _prepare_out_dir(out, params, overwrite)
    paths = {split: str(out / f"{split}_cuts.jsonl.gz") for split in SPLITS}
    if existing is not None:
        if progress:
            print(f"corpus in '{out}' is complete (seed {seed}, {hours} h); nothing to do")
        return {**paths, "stats": existing["stats"]}
    for split in SPLITS:
        (out / "audio" / split).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    plans = plan_corpus(hours, seed, min_eval_utterances)
    jobs = [(p, str(out / "audio" / p.split / f"{p.id}.flac")) for s in SPLITS for p in plans[s]]
    bar = progress_bar(total=len(jobs), desc="synthesizing", unit="utt", disable=not progress)
    num_samples: list[int] = []
    # Always in spawned worker processes, even for one worker: eSpeak forks once per utterance
    # (see speedasr.prep.espeak), which is cheap only in a small process that never imported torch.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        for n in pool.imap(_synthesize_to_file, jobs, chunksize=4):
            num_samples.append(n)
            bar.update()
    bar.close()
    wall = time.perf_counter() - start

    stats: dict = {"splits": {}}
    samples = iter(num_samples)
    for split in SPLITS:
        cuts = [_make_cut(p, Path(path), next(samples)) for p, path in jobs if p.split == split]
        CutSet.from_cuts(cuts).to_file(paths[split])
        stats["splits"][split] = duration_stats([c.duration for c in cuts])
    audio_seconds = sum(num_samples) / SAMPLE_RATE
    stats["all"] = duration_stats([n / SAMPLE_RATE for n in num_samples])
    stats["wall_seconds"] = round(wall, 2)
    stats["audio_seconds_per_wall_second"] = round(audio_seconds / max(wall, 1e-9), 1)
    stats["workers"] = workers
    info = {"params": params, "stats": stats, "manifests": {s: Path(paths[s]).name for s in SPLITS}}
    # corpus.json is written last: its presence marks a complete corpus.
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    if progress:
        print(summary_line(stats, out))
    return {**paths, "stats": stats}


def summary_line(stats: dict, out: Path) -> str:
    splits = stats["splits"]
    hours = " / ".join(f"{s} {splits[s]['hours']:.2f} h" for s in SPLITS)
    a = stats["all"]
    return (
        f"{a['utterances']} utterances ({hours}); duration median {a['median']:.1f} s, "
        f"p95 {a['p95']:.1f} s, max {a['max']:.1f} s, {a['under_1_5s']} under 1.5 s; "
        f"{stats['wall_seconds']:.1f} s wall ({stats['audio_seconds_per_wall_second']:.0f} s of "
        f"audio per second, {stats['workers']} workers) -> {out}"
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--hours", type=float, default=1.0, help="train hours (approximate)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes (default 2)")
    parser.add_argument(
        "--min-eval-utterances", type=int, default=50, help="minimum dev and test utterances"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a corpus with other parameters in --out"
    )


def run(args: argparse.Namespace) -> int:
    synthesize_corpus(
        args.out,
        hours=args.hours,
        seed=args.seed,
        workers=args.workers,
        min_eval_utterances=args.min_eval_utterances,
        overwrite=args.overwrite,
    )
    return 0
