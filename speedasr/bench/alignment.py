"""``speedasr bench alignment``: does the attention decoder learn to align, with audio taken out?

The real ``AEDModel`` is trained on *oracle* features: each text token becomes 1-3 encoder frames
(8-24 input frames) of a fixed random vector per token plus Gaussian noise, and transcripts are
random token strings (Zipf-like frequencies, 4-40 tokens), so nothing can be memorised and nothing
but alignment is hard. The CTC head reads such frames almost perfectly within a few hundred
updates; what the attention decoder reaches (free-running greedy WER on held-out transcripts) in
the same updates measures how well cross-attention finds its place (issue 17). A few minutes on a
2-core CPU; no audio, no files.

Model options are overridden with ``--model.KEY=VALUE`` (``ModelConfig`` fields, as in
``speedasr train``), e.g. ``--model.absolute_memory_positions=true``; docs/training.md has the
variants measured so far.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict

import torch

from speedasr.core.geometry import N_MELS, SUBSAMPLING_FACTOR
from speedasr.models.aed import ModelConfig
from speedasr.options import add_config_overrides

PAD_ID, SOT_ID, EOT_ID = 0, 1, 2
"""Pad (and CTC blank), start of transcript (the one-token prompt), end of text."""
FIRST_TEXT_ID = 3


class OracleTask:
    """Random transcripts and their oracle features (see the module docstring)."""

    def __init__(self, text_tokens: int, n_mels: int, noise: float, seed: int) -> None:
        self.text_tokens, self.n_mels, self.noise = text_tokens, n_mels, noise
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) ** 0.8 for i in range(text_tokens)]
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(FIRST_TEXT_ID + text_tokens, n_mels, generator=gen)

    @property
    def vocab_size(self) -> int:
        return FIRST_TEXT_ID + self.text_tokens

    def transcripts(self, n: int) -> list[list[int]]:
        """``n`` random transcripts of 4-40 text ids (log-normal lengths, median ~13)."""
        out = []
        for _ in range(n):
            length = int(min(40, max(4, self.rng.lognormvariate(2.6, 0.5))))
            ids = self.rng.choices(range(self.text_tokens), self.weights, k=length)
            out.append([FIRST_TEXT_ID + t for t in ids])
        return out

    def features(self, transcript: list[int], gen: torch.Generator) -> torch.Tensor:
        """``(T, n_mels)``: 1-3 encoder frames of each token's prototype plus noise."""
        rows = []
        for token in transcript:
            frames = SUBSAMPLING_FACTOR * int(torch.randint(1, 4, (), generator=gen))
            noise = self.noise * torch.randn(frames, self.n_mels, generator=gen)
            rows.append(self.prototypes[token].expand(frames, -1) + noise)
        return torch.cat(rows)

    def batch(self, transcripts: list[list[int]], gen: torch.Generator):
        """A ``PackedBatch``: prompt ``[SOT]``, targets ``text + [EOT]``."""
        from speedasr.core.batch import PackedBatch
        from speedasr.core.segments import Segments

        feats = [self.features(t, gen) for t in transcripts]
        tokens = [[SOT_ID, *t] for t in transcripts]
        targets = [[*t, EOT_ID] for t in transcripts]
        return PackedBatch(
            features=torch.cat(feats),
            feature_segments=Segments.from_lengths([len(f) for f in feats]),
            tokens=torch.tensor([i for seq in tokens for i in seq]),
            targets=torch.tensor([i for seq in targets for i in seq]),
            token_segments=Segments.from_lengths([len(seq) for seq in tokens]),
            prompt_lengths=tuple(1 for _ in transcripts),
        )


def _as_words(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


@torch.no_grad()
def measure(model, task: OracleTask, batch) -> dict[str, float]:
    """Teacher-forced cross-entropy and free-running greedy WER (attention and CTC), in %."""
    from speedasr.decoding import DecodingOptions, decode
    from speedasr.metrics import word_error_rate

    model.eval()
    refs = [_as_words(seq.tolist()[:-1]) for seq in batch.token_segments.split(batch.targets)]
    prompts = [[SOT_ID]] * batch.batch_size
    out = model(batch)
    row = {"ce": float(out.ce_loss)}
    searches = {"attention_wer": DecodingOptions(max_len=60)}
    if model.ctc_head is not None:
        searches["ctc_wer"] = DecodingOptions(method="ctc")
    for name, options in searches.items():
        hyps = decode(model, batch.features, batch.feature_segments, prompts, EOT_ID, options)
        row[name] = 100 * word_error_rate(refs, [_as_words(h) for h in hyps])
    model.train()
    return row


def run_probe(args: argparse.Namespace, overrides: dict, log=print) -> list[dict]:
    """Train ``args.steps`` updates; measure at every ``args.eval_every`` and at the end."""
    from speedasr.models.aed import AEDModel

    task = OracleTask(args.text_tokens, n_mels=N_MELS, noise=args.noise, seed=args.seed)
    train, held_out = task.transcripts(args.transcripts), task.transcripts(args.eval_utterances)
    eval_batch = task.batch(held_out, torch.Generator().manual_seed(args.seed + 1))
    base = dict(
        vocab_size=task.vocab_size, pad_id=PAD_ID, d_model=144, encoder_layers=4, encoder_heads=4,
        decoder_layers=1, subsampling_channels=32, ctc_weight=0.5, attention_backend="torch",
    )  # fmt: skip
    cfg = ModelConfig(**{**base, **overrides})
    torch.manual_seed(args.seed)
    model = AEDModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(100, args.steps)

    def lr_factor(step: int) -> float:
        return min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(args.seed + 2)
    order: list[int] = []
    rows, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            order = torch.randperm(len(train), generator=gen).tolist()
        picked, order = order[: args.batch_size], order[args.batch_size :]
        out = model(task.batch([train[i] for i in picked], gen))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
            row |= {k: round(v, 2) for k, v in measure(model, task, eval_batch).items()}
            rows.append(row)
            log(json.dumps(row))
    return [{"config": asdict(cfg), **row} for row in rows]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=800, help="updates (default 800)")
    parser.add_argument("--batch-size", type=int, default=24, help="utterances per update")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=200, help="updates between measures")
    parser.add_argument("--eval-utterances", type=int, default=150, help="held-out transcripts")
    parser.add_argument("--transcripts", type=int, default=2500, help="training transcripts")
    parser.add_argument("--text-tokens", type=int, default=200, help="distinct text tokens")
    parser.add_argument("--noise", type=float, default=0.5, help="noise std on the prototypes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", default=None, help="write the measures here (a JSON list)")
    add_config_overrides(
        parser, {"model": ModelConfig}, "--model.absolute_memory_positions=true",
        deprecated_set_section="model",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speedasr.errors import UserError

    for name in ("steps", "batch_size", "eval_every", "eval_utterances", "transcripts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.text_tokens < 2 or args.lr <= 0 or args.noise < 0:
        raise UserError("--text-tokens must be >= 2, --lr > 0 and --noise >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        rows = run_probe(args, args.overrides.section("model"))
    except ValueError as e:  # ModelConfig names the conflicting setting
        raise UserError(str(e)) from e
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
