"""`speedasr data export-shar --cuts CUTS --out DIR`: a validated cutset (with its audio) as lhotse
Shar shards, which training reads lazily and in order (``speedasr.data.shar``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from speedasr.errors import UserError


def export_shar(
    cuts, out_dir: str | Path, shard_size: int = 1000, audio_format: str = "flac"
) -> dict[str, list[str]]:
    """Write ``cuts`` (with their audio, re-encoded as ``audio_format``) as Shar shards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return cuts.to_shar(out_dir, fields={"recording": audio_format}, shard_size=shard_size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, help="lhotse cut manifest (.jsonl.gz)")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="cuts per shard")
    parser.add_argument(
        "--audio-format", default="flac", choices=("flac", "wav", "opus"),
        help="audio encoding inside the tar files (flac: lossless, default)",
    )  # fmt: skip
    parser.add_argument(
        "--check-audio", choices=("none", "header", "full"), default="header",
        help="validation before export (invalid cuts are left out, listed in OUT.rejects.jsonl)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from speedasr.data.manifests import load_cuts, validate_cuts

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory '{out}' is not empty")
    cuts = load_cuts(args.cuts)
    # Validation first: exporting reads every cut's audio, and a command source would run.
    accepted, report = validate_cuts(cuts, check_audio=args.check_audio)
    rejects = out.with_name(out.name + ".rejects.jsonl")  # lhotse reads every file inside out/
    report.write(rejects)
    print(report.summary())
    print(f"rejects: {rejects}")
    if not report.accepted:
        raise UserError("no valid cuts to export")
    shards = export_shar(accepted, out, args.shard_size, args.audio_format)
    n = math.ceil(report.accepted / args.shard_size)
    print(f"wrote {n} shard(s) of up to {args.shard_size} cuts to {out}: {sorted(shards)}")
    return 0
