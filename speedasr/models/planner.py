"""Compute-budget planner: ``speedasr plan``.

Given a training compute budget and a corpus, how many passes over the data does each candidate
model buy? A budget is raw FLOPs, or ``GPU-hours × 3600 × peak FLOP/s × expected MFU``. For each
parameter count, candidate shapes range from narrow-and-deep to wide-and-shallow (same parameters,
same encoder share); the planner reports epochs per shape, flags runs that would iterate many
times over limited data (or not finish one pass), and marks the preferred shape of each size.

FLOPs accounting (``speedasr.models.sizing.count_flops``, shared with ``model info`` and the
training MFU monitor): multiply-adds count 2; only matmuls and convolutions (norms, activations,
softmax are a few % at these sizes and omitted); causal self-attention counted as the full
``L × L`` square (what dense kernels compute); training = 3 × forward. Per utterance of ``T``
feature frames (``T' = ceil(T/8)`` encoder frames) and ``L`` decoder tokens (prompt included):

- encoder: subsampling (convolutions, or stacking's one linear map) + ``layers × T' × (FFN×2 +
  QKV/out + conv module)`` matmuls + attention ``layers × 2·T'²·d``;
- decoder: ``layers × L × (self QKV/out + cross Q/out + FFN)`` + cross K/V of the ``T'`` frames
  per layer + output layer ``L·d·V`` + attention ``layers × 2·(L² + L·T')·d``.

Epoch FLOPs assume utterances of ``--duration`` seconds carrying ``--tokens-per-second`` text
tokens plus a prompt: ``epoch = train FLOPs per audio second × corpus seconds``. A prompt's length
is its tokenizer's ``prompt_length``; the candidates here are new models trained with speedasr's
tokenizer, so the planner counts its prompt (``PROMPT_TOKENS``; NeMo's canary2 prompt is 9).
At inference (``inference_flops``) the forward FLOPs are the same with a KV cache (each token is
computed once), but the decoder runs them as ``L`` sequential steps.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from speedasr.core.geometry import encoder_length, num_input_frames
from speedasr.errors import UserError
from speedasr.models.aed import ModelConfig
from speedasr.models.sizing import (
    PROMPT_TOKENS,
    config_from_budget,
    count_flops,
    count_parameters,
    training_flops_per_audio_second,
)
from speedasr.options import human_count, parse_count

CANDIDATE_WIDTHS: tuple[tuple[int, int], ...] = (
    (144, 4), (192, 4), (256, 4), (384, 6), (512, 8), (768, 12), (1024, 16), (1280, 20),
    (1536, 24), (2048, 32), (2560, 40),
)  # fmt: skip
"""(d_model, heads) of the candidate shapes: head dim 36-64 (all even for rotary)."""


@dataclass(frozen=True)
class Budget:
    """A training compute budget in FLOPs."""

    flops: float

    @classmethod
    def from_gpu_hours(cls, gpu_hours: float, peak_flops: float, mfu: float) -> Budget:
        """``gpu_hours × 3600 s × peak FLOP/s per GPU × model FLOPs utilization``."""
        if gpu_hours <= 0 or peak_flops <= 0:
            raise UserError("GPU-hours and peak FLOP/s must be > 0")
        if not 0 < mfu <= 1:
            raise UserError(f"MFU must be in (0, 1], got {mfu}")
        return cls(gpu_hours * 3600.0 * peak_flops * mfu)


@dataclass(frozen=True)
class Corpus:
    """Training data, as FLOPs see it."""

    hours: float
    """Audio hours in one epoch."""
    utterance_seconds: float = 10.0
    """Typical utterance length (attention terms are quadratic in it)."""
    tokens_per_second: float = 4.0
    """Text tokens per second of audio (BPE English: ~3-5)."""


@dataclass(frozen=True)
class PlanRow:
    """One candidate shape under the budget."""

    size: str
    """The parameter target this shape was built for (e.g. ``100M``)."""
    params: int
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    encoder_share: float
    """Fraction of parameters in the encoder."""
    flops_per_epoch: float
    epochs: float
    """Passes over the corpus the budget buys."""
    flag: str
    """``ok``, ``many-epochs`` (iterates many times over limited data) or ``under-one-epoch``."""
    preferred: bool
    """The shape recommended for this size (see ``plan``)."""


def epoch_flops(cfg: ModelConfig, corpus: Corpus) -> float:
    """Training FLOPs of one pass over ``corpus`` (see the module docstring)."""
    per_second = training_flops_per_audio_second(
        cfg, corpus.utterance_seconds, corpus.tokens_per_second
    )
    return per_second * corpus.hours * 3600.0


@dataclass(frozen=True)
class InferenceFlops:
    """Forward FLOPs of transcribing one utterance, encoder vs decoder."""

    encoder: int
    decoder: int
    decoder_steps: int
    """Sequential decoder calls (one per emitted token, prompt in one call)."""

    @property
    def encoder_fraction(self) -> float:
        return self.encoder / max(self.encoder + self.decoder, 1)


def inference_flops(
    cfg: ModelConfig, frames: int, tokens: int, prompt: int = PROMPT_TOKENS
) -> InferenceFlops:
    """FLOPs to transcribe ``frames`` feature frames into ``tokens`` emitted tokens after a
    ``prompt``-token prompt (the KV cache computes each position once: the forward's FLOPs).
    ``prompt``: the tokenizer's ``prompt_length`` (default: speedasr's tokenizer's). The CTC head
    is not used at inference and not counted."""
    f = count_flops(cfg, frames, prompt + tokens)
    return InferenceFlops(
        encoder=f.encoder_dense + f.encoder_attention,
        decoder=f.decoder_dense + f.decoder_attention,
        decoder_steps=tokens,
    )


def candidate_shapes(
    params: float, encoder_share: float, max_encoder_layers: int = 64, **overrides
) -> list[ModelConfig]:
    """Shapes of about ``params`` parameters, one per candidate width, narrowest first (only
    shapes with 2 to ``max_encoder_layers`` encoder layers, within 15% of the target)."""
    shapes = []
    for d, heads in CANDIDATE_WIDTHS:
        cfg = config_from_budget(params, encoder_share, d_model=d, encoder_heads=heads, **overrides)
        total = count_parameters(cfg).total
        depth_ok = 2 <= cfg.encoder_layers <= max_encoder_layers
        if depth_ok and abs(total - params) <= 0.15 * params:
            shapes.append(cfg)
    return shapes


def plan(
    budget: Budget, corpus: Corpus, sizes: list[float], encoder_share: float = 0.85,
    max_encoder_layers: int = 32, many_epochs: float = 20.0, **overrides,
) -> list[PlanRow]:  # fmt: skip
    """Every candidate shape of every size, with the epochs ``budget`` buys on ``corpus``.

    Preferred shape of a size: the narrowest (hence deepest) whose encoder has at most
    ``max_encoder_layers`` layers. At equal parameters, deeper-narrower trains better until depth
    makes optimization and latency hard (Canary-1B-flash: 32 encoder layers at width 1024); it costs
    slightly more attention FLOPs per epoch (``layers × d`` grows as the width shrinks), which the
    epochs column shows.
    """
    rows = []
    for size in sizes:
        shapes = candidate_shapes(size, encoder_share, 2 * max_encoder_layers, **overrides)
        if not shapes:
            raise UserError(f"no candidate shape fits {human_count(size)} parameters")
        fitting = [c for c in shapes if c.encoder_layers <= max_encoder_layers]
        preferred = (fitting or shapes[-1:])[0]
        rows += [
            _row(human_count(size), cfg, budget, corpus, many_epochs, cfg is preferred)
            for cfg in shapes
        ]
    return rows


def plan_configs(
    budget: Budget, corpus: Corpus, configs: dict[str, ModelConfig], many_epochs: float = 20.0
) -> list[PlanRow]:
    """The same rows for given configs (``size`` = their names; none is marked preferred)."""
    return [_row(name, cfg, budget, corpus, many_epochs, False) for name, cfg in configs.items()]


def _row(
    size: str, cfg: ModelConfig, budget: Budget, corpus: Corpus, many_epochs: float, preferred: bool
) -> PlanRow:
    if budget.flops <= 0:
        raise UserError(f"compute budget must be > 0 FLOPs, got {budget.flops}")
    if corpus.hours <= 0:
        raise UserError(f"corpus hours must be > 0, got {corpus.hours}")
    if corpus.utterance_seconds <= 0 or corpus.tokens_per_second < 0:
        raise UserError("utterance seconds must be > 0 and tokens per second >= 0")
    p = count_parameters(cfg)
    per_epoch = epoch_flops(cfg, corpus)
    epochs = budget.flops / per_epoch
    flag = "ok"
    if epochs > many_epochs:
        flag = "many-epochs"
    elif epochs < 1:
        flag = "under-one-epoch"
    return PlanRow(
        size=size, params=p.total, d_model=cfg.d_model, heads=cfg.encoder_heads,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        encoder_share=p.encoder / p.total, flops_per_epoch=per_epoch, epochs=epochs, flag=flag,
        preferred=preferred,
    )  # fmt: skip


# --- command --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    b = parser.add_argument_group("budget (either --flops, or --gpu-hours with --peak-tflops)")
    b.add_argument("--flops", help="raw training FLOPs (e.g. 1e21)")
    b.add_argument("--gpu-hours", type=float, help="GPU-hours")
    b.add_argument(
        "--peak-tflops",
        type=float,
        help="peak dense TFLOP/s per GPU in the training dtype (H100 bf16: 989)",
    )
    b.add_argument("--mfu", type=float, default=0.4, help="expected model FLOPs utilization")
    parser.add_argument("--corpus-hours", type=float, required=True, help="audio hours per epoch")
    parser.add_argument(
        "--sizes", default="30M,100M,300M,1B", help="comma-separated parameter counts to consider"
    )
    parser.add_argument(
        "--encoder-share", type=float, default=0.85, help="fraction of parameters in the encoder"
    )
    parser.add_argument(
        "--max-encoder-layers",
        type=int,
        default=32,
        help="deepest encoder the preferred shape may have",
    )
    parser.add_argument(
        "--many-epochs",
        type=float,
        default=20.0,
        help="flag shapes the budget would run for more epochs than this",
    )
    parser.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary")
    parser.add_argument("--duration", type=float, default=10.0, help="typical utterance, seconds")
    parser.add_argument(
        "--tokens-per-second", type=float, default=4.0, help="text tokens per second of audio"
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    # fmt: skip


def run(args: argparse.Namespace) -> int:
    if (args.flops is None) == (args.gpu_hours is None):
        raise UserError("give the budget as exactly one of --flops or --gpu-hours")
    if args.flops is not None:
        budget = Budget(parse_count(args.flops, "--flops"))
        source = f"{budget.flops:.3g} FLOPs"
    else:
        if args.peak_tflops is None:
            raise UserError("--gpu-hours needs --peak-tflops (and optionally --mfu)")
        budget = Budget.from_gpu_hours(args.gpu_hours, args.peak_tflops * 1e12, args.mfu)
        source = (f"{args.gpu_hours:g} GPU-h × {args.peak_tflops:g} TFLOP/s × MFU {args.mfu:g} "
                  f"= {budget.flops:.3g} FLOPs")  # fmt: skip
    if not 0 < args.encoder_share < 1:
        raise UserError(f"--encoder-share must be in (0, 1), got {args.encoder_share}")
    if args.vocab_size < 16:
        raise UserError(f"--vocab-size must be >= 16, got {args.vocab_size}")
    sizes = [parse_count(s, "--sizes entry") for s in args.sizes.split(",") if s.strip()]
    corpus = Corpus(args.corpus_hours, args.duration, args.tokens_per_second)
    rows = plan(budget, corpus, sizes, args.encoder_share, args.max_encoder_layers,
                args.many_epochs, vocab_size=args.vocab_size)  # fmt: skip
    if args.json:
        print(json.dumps({"budget_flops": budget.flops, "corpus_hours": corpus.hours,
                          "rows": [asdict(r) for r in rows]}, indent=2))  # fmt: skip
        return 0
    print(
        f"budget: {source}; corpus: {corpus.hours:g} h of {corpus.utterance_seconds:g} s "
        f"utterances, {corpus.tokens_per_second:g} tokens/s (+{PROMPT_TOKENS} prompt)"
    )
    print(f"{'size':>6} {'params':>8} {'d_model':>7} {'enc':>4} {'dec':>4} {'enc%':>5} "
          f"{'PFLOP/epoch':>12} {'epochs':>9}  flag")  # fmt: skip
    for r in rows:
        mark = "  <- preferred" if r.preferred else ""
        print(f"{r.size:>6} {human_count(r.params):>8} {r.d_model:>7} {r.encoder_layers:>4} "
              f"{r.decoder_layers:>4} {100 * r.encoder_share:>4.0f}% "
              f"{r.flops_per_epoch / 1e15:>12.3g} {r.epochs:>9.3g}  {r.flag}{mark}")  # fmt: skip
    print(
        "\npreferred: the narrowest (deepest) shape with <= "
        f"{args.max_encoder_layers} encoder layers. many-epochs: > {args.many_epochs:g} passes "
        "over the same data (returns diminish: prefer a larger model or more data). FLOPs: "
        "matmuls + convolutions, training = 3x forward (see `speedasr.models.planner`)."
    )
    return 0


def frames_and_tokens(duration: float, tokens_per_second: float) -> tuple[int, int, int]:
    """(feature frames, encoder frames, text tokens) of one utterance."""
    frames = num_input_frames(duration)
    return frames, encoder_length(frames), round(tokens_per_second * duration)
