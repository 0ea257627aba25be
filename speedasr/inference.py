"""Batched transcription: ``speedasr transcribe --ckpt CKPT (AUDIO... | --cuts CUTS)``.

Batches are packed (no padding in the encoder) and decoded with ``speedasr.decoding``; the same
``transcribe_batch`` serves training-time validation, ``speedasr eval`` and this command, so a WER
measured in any of them is the same number.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from speedasr.core.batch import PackedBatch, PaddedBatch
from speedasr.data.manifests import Reject, format_reason_counts
from speedasr.decoding import DecodingOptions
from speedasr.decoding.transcribe import (  # noqa: F401  (transcribe_batch: docs name it here too)
    cuts_from_audio,
    feature_frontend,
    iterate_batches,
    transcribe_batch,
)
from speedasr.errors import UserError
from speedasr.nn.attention import BACKENDS, check_attention_backend
from speedasr.options import DTYPE_ALIASES, add_dtype_argument


# --- command-line pieces shared with `speedasr eval` ----------------------------------------------
def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument(
        "--decoder",
        choices=("attention", "ctc"),
        default="attention",
        help="attention: the AED decoder (default); ctc: greedy CTC head of a hybrid model",
    )
    group.add_argument("--beam-size", type=int, default=1, help="1 = greedy search (default)")
    group.add_argument(
        "--ctc-weight",
        type=float,
        default=0.0,
        help="joint CTC/attention decoding: weight of the CTC head's prefix score, in [0, 1] "
        "(hybrid models; 0 = decoder only, the default)",
    )
    group.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam ranking: logprob / length**penalty (1 = per-token mean)",
    )
    group.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="most tokens per utterance (default: 8 + 10 per second of audio)",
    )
    group.add_argument(
        "--no-cache",
        action="store_true",
        help="reference decoding without KV cache (slow; greedy only)",
    )
    group.add_argument(
        "--batch-duration", type=float, default=200.0, help="seconds of audio per batch"
    )
    group.add_argument("--batch-size", type=int, default=None, help="most utterances per batch")
    group.add_argument("--device", default="cpu")
    group.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        default=None,
        help="attention implementation (default: the checkpoint's model.attention_backend): "
        "auto (triton on CUDA, else torch), torch (runs everywhere), triton, flash_attn (CUDA)",
    )
    add_dtype_argument(
        group, "float32",
        "weights and activations: float32 (default); bfloat16 (about 2x faster matmuls on "
        "GPUs and on CPUs with AVX512-BF16 or AMX); float16 (GPU only); fp32, bf16, fp16 also "
        "accepted",
    )  # fmt: skip


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """``DecodingOptions`` from ``add_decoding_arguments``; ``UserError`` on a bad combination."""
    if args.batch_duration <= 0:
        raise UserError(f"--batch-duration must be > 0, got {args.batch_duration}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        return DecodingOptions(
            method=args.decoder, beam_size=args.beam_size, length_penalty=args.length_penalty,
            max_len=args.max_len, use_cache=not args.no_cache, ctc_weight=args.ctc_weight,
        )  # fmt: skip
    except ValueError as e:
        raise UserError(f"decoding options: {e}") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``--dtype`` as a torch dtype; ``UserError`` for float16 on a CPU, a note on stderr when
    bfloat16 runs on a CPU without native bfloat16 matmuls (it works, but slower than float32)."""
    dtype = DTYPES[DTYPE_ALIASES.get(name, name)]
    on_cpu = torch.device(device).type == "cpu"
    if dtype == torch.float16 and on_cpu:
        raise UserError("--dtype float16 needs a GPU; on a CPU use bfloat16 (or float32)")
    if dtype == torch.bfloat16 and on_cpu and not _cpu_has_native_bfloat16():
        print(
            "note: this CPU has no native bfloat16 matmuls (AVX512-BF16/AMX); --dtype bfloat16 "
            "will be slower than float32 here",
            file=sys.stderr,
        )
    return dtype


def _cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX on x86 (oneDNN's own bf16 check accepts plain AVX-512, which only
    emulates bfloat16 matmuls); private torch helpers, so unknown counts as yes (no note)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return True


def load_for_inference(args: argparse.Namespace, options: DecodingOptions):
    """The checkpoint ``--ckpt`` on ``--device`` in ``--dtype`` with ``--attention-backend``
    (``LoadedModel``); ``UserError`` if ``options`` ask for a part the model lacks (CTC head) or
    the attention backend cannot run on ``--device``."""
    from speedasr.checkpoint import load_model

    loaded = load_model(
        args.ckpt, args.device, inference_dtype(args.dtype, args.device), args.attention_backend
    )
    backend = loaded.config.attention_backend
    check_attention_backend(
        backend, torch.device(args.device).type == "cuda",
        setting=(f"--attention-backend {backend}" if args.attention_backend else
                 f"checkpoint '{args.ckpt}': model.attention_backend={backend}"),
        device=f"--device is {args.device}", instead="--attention-backend auto or torch",
    )  # fmt: skip
    if options.method == "ctc" and loaded.model.ctc_head is None:
        raise UserError(f"{args.ckpt}: --decoder ctc needs a CTC head; this model has none")
    if options.ctc_weight > 0 and loaded.model.ctc_head is None:
        raise UserError(f"{args.ckpt}: --ctc-weight needs a CTC head; this model has none")
    return loaded


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", nargs="*", help="audio files (any format soundfile reads)")
    parser.add_argument("--cuts", help="a lhotse cutset to transcribe instead of audio files")
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt)")
    parser.add_argument("--language", default="en", help="prompt language token (audio files)")
    parser.add_argument("--out", help="also write JSON lines {id, source, text} to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_decoding_arguments(parser)


def skipped_cuts(batch: PackedBatch | PaddedBatch) -> list[Reject]:
    """The cuts the dataset left out of ``batch`` (audio failed to load), with their reasons."""
    reasons = batch.skipped_reasons
    return [
        Reject(cut_id, reason, detail)
        for cut_id, (reason, detail) in zip(batch.skipped_cut_ids, reasons, strict=True)
    ]


def run(args: argparse.Namespace) -> int:
    """Transcribe; exit 0 only if every input was transcribed. Each one that was not (its audio
    cannot be loaded, a duplicate id, a command source...) gets a line on stderr with its reason,
    and the run ends with a count of them and exit code 1."""
    from speedasr.console import progress_bar
    from speedasr.data.manifests import load_cuts, validate_cuts

    if bool(args.audio) == bool(args.cuts):
        raise UserError("give either audio files or --cuts (not both, not neither)")
    options = decoding_options(args)
    loaded = load_for_inference(args, options)
    if args.cuts:
        cuts = load_cuts(args.cuts)
    else:
        loaded.tokenizer.prompt(args.language)  # validates the language before any work
        cuts = cuts_from_audio(args.audio, args.language)
    total = len(cuts)
    # The same checks as eval (no transcript needed): duplicate ids, command sources (never run),
    # zero durations, missing or unreadable files.
    cuts, report = validate_cuts(cuts, check_audio="header", require_text=False)
    failed = list(report.rejects)
    for r in failed:
        print(_failure_line(r), file=sys.stderr)
    out = open(args.out, "w") if args.out else None
    bar = progress_bar(total=len(cuts), desc="transcribe", unit="utt", disable=args.quiet)
    try:
        batches = iterate_batches(
            cuts, loaded.tokenizer, args.batch_duration, args.device, args.batch_size,
            n_mels=loaded.config.n_mels, frontend=feature_frontend(loaded.model),
        )  # fmt: skip
        for batch in batches:
            for r in skipped_cuts(batch):
                bar.write(_failure_line(r), file=sys.stderr)
                failed.append(r)
            bar.update(len(batch.skipped_cut_ids))
            if batch.batch_size == 0:  # every cut of this batch failed to load
                continue
            texts = transcribe_batch(loaded.model, loaded.tokenizer, batch, options)
            for cut_id, text in zip(batch.cut_ids, texts, strict=True):
                cut = cuts[cut_id]
                source = cut.recording.sources[0].source if args.audio else cut_id
                bar.write(f"{source}\t{text}", file=sys.stdout)
                if out:
                    out.write(json.dumps({"id": cut_id, "source": source, "text": text}) + "\n")
            bar.update(batch.batch_size)
    finally:
        bar.close()
        if out:
            out.close()
    if failed:
        print(
            f"speedasr transcribe: transcribed {total - len(failed)} of {total} inputs; not "
            f"transcribed: {format_reason_counts(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _failure_line(r: Reject) -> str:
    return f"speedasr transcribe: {r.cut_id}: not transcribed: {r.reason} ({r.detail})"
