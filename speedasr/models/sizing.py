"""Model sizes: presets, parameter and FLOP counts, and an encoder/decoder split planner.

``speedasr model info [PRESET ...] [--budget 100M --encoder-share 0.85] [--model.KEY=VALUE ...]``
prints parameters (encoder / decoder / total) and training FLOPs per second of audio.

Counts are closed-form (no model is built) and tested equal to the instantiated ``AEDModel``
(parameters) and to torch's FLOP counter (FLOPs). FLOPs count multiply-adds as 2 and include
only matmuls and convolutions (norms and activations are noise at these sizes). Training FLOPs are
3x the forward (backward = 2x forward). Attention terms depend on utterance length, so FLOPs "per
second of audio" assume utterances of ``duration`` seconds with ``tokens_per_second`` text tokens;
the per-position terms do not depend on that assumption. Decoder tokens are the prompt's plus
the text's: the prompt length is the tokenizer's (``prompt_tokens``; a preset's own, e.g. NeMo's
9-token canary2 prompt for ``canary-1b-flash``; speedasr's 4 by default).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace

from speedasr.core.geometry import PROMPT_TOKENS, num_input_frames
from speedasr.data.nemo_tokenizer import PROMPT_LENGTHS
from speedasr.errors import UserError
from speedasr.models.aed import ModelConfig
from speedasr.options import add_config_overrides, human_count, parse_count


def nemo_vocab_size(tokens: int) -> int:
    """NeMo's embedding and head rows for a tokenizer of ``tokens`` pieces: padded up to a
    multiple of 8 (``EncDecMultiTaskModel``; docs/canary.md §6.3)."""
    return 8 * -(-tokens // 8)


_CANARY = dict(
    # What NeMo's Canary models compute (docs/canary.md §2-6; import-nemo sets the same options):
    # Transformer-XL relative positions, BatchNorm in the conv module, xscaling (ConformerEncoder's
    # default; no shape depends on it and an imported .nemo brings its own value), NeMo's 128-mel
    # front end, a decoder with fixed sinusoids / sqrt(width) on the token embeddings and no
    # rotary, a head tied to the embedding with its own bias, no CTC head.
    n_mels=128, frontend="nemo", encoder_positions="rel_pos", xscaling=True, conv_norm="batch",
    block_out_norm=True, absolute_token_positions=True, token_position_scale=None,
    decoder_rotary=False, tie_embeddings=True, ctc_weight=0.0, dropout=0.1,
    # NeMo's fast-conformer_aed.yaml (examples/asr/conf/speech_multitask), which the Canary
    # configs follow: dw_striding x8 with 256 channels, 8 heads, conv kernel 9, FFN 4x (encoder
    # ff_expansion_factor; decoder inner_size = 4 x hidden_size).
    subsampling_channels=256, encoder_heads=8, decoder_heads=8, conv_kernel=9, ff_mult=4,
)  # fmt: skip
PRESETS: dict[str, ModelConfig] = {
    # CPU presets (256-token vocabulary of the embedded tiny recipe).
    "tiny": ModelConfig(),
    "small": ModelConfig(
        d_model=256, encoder_layers=12, encoder_heads=4, decoder_layers=4, subsampling_channels=64
    ),
    # Published Canary shapes, so a preset built from scratch has the real checkpoint's state-dict
    # shapes (tests/models/test_canary_presets.py; docs/canary.md §14). Layer counts and
    # parameters: the model cards; widths: the model cards and fast-conformer_aed.yaml
    # (model_defaults asr_enc_hidden / lm_dec_hidden). Vocabularies, padded to a multiple of 8:
    # 4128 and 5248 are this file's earlier values (4 languages x 1024 pieces + the special-token
    # model), not checked against a real file here; 16384 for canary-1b-v2 is the head's row count
    # as third-party ports of it describe. import-nemo of the real file states the exact value.
    "canary-1b": ModelConfig(  # model card: 24 + 24 layers, 1024 wide; canary prompt, 4 languages
        vocab_size=nemo_vocab_size(4128),
        d_model=1024,
        encoder_layers=24,
        decoder_layers=24,
        **_CANARY,
    ),  # fmt: skip
    "canary-1b-flash": ModelConfig(  # model card: 32 + 4 layers, 883M; 4 languages, canary2
        vocab_size=nemo_vocab_size(5248),
        d_model=1024,
        encoder_layers=32,
        decoder_layers=4,
        **_CANARY,
    ),  # fmt: skip
    "canary-180m-flash": ModelConfig(  # model card: 17 + 4 layers, 182M; encoder 512 -> 1024
        vocab_size=nemo_vocab_size(5248),
        d_model=512,
        encoder_layers=17,
        decoder_layers=4,
        decoder_d_model=1024,
        **_CANARY,
    ),  # fmt: skip
    # canary-1b-v2: 978M parameters, 25 languages, one unified 16384-piece tokenizer, encoder
    # and decoder 1024 wide (model card, arXiv 2509.14128). Its decoder depth is not stated in
    # what was read: 8 layers are the count that gives the published 978M (4 would give ~895M).
    "canary-1b-v2": ModelConfig(
        vocab_size=nemo_vocab_size(16384),
        d_model=1024,
        encoder_layers=32,
        decoder_layers=8,
        **_CANARY,
    ),  # fmt: skip
}
PRESET_PROMPT_FORMATS: dict[str, str] = {
    # The NeMo prompt format each published checkpoint's config names (its model card / config:
    # canary-1b is the first Canary, the flash and v2 models use canary2).
    "canary-1b": "canary",
    "canary-1b-flash": "canary2",
    "canary-180m-flash": "canary2",
    "canary-1b-v2": "canary2",
}


def preset_prompt_tokens(name: str) -> int:
    """Prompt tokens of the tokenizer a preset is trained with: its NeMo prompt format's, or
    speedasr's own prompt for the others."""
    fmt = PRESET_PROMPT_FORMATS.get(name)
    return PROMPT_LENGTHS[fmt] if fmt else PROMPT_TOKENS


PUBLISHED_PARAMS: dict[str, float] = {
    "canary-1b": 1.0e9,  # model card: "1 billion parameters" (a rounded figure)
    "canary-1b-flash": 883e6,  # model card: "883M parameters"
    "canary-180m-flash": 182e6,  # model card: "182M parameters"
    "canary-1b-v2": 978e6,  # model card: "978M parameters"
}

# Width ladder of the budget planner: (d_model, heads); head dims 36-128, all even (rotary).
_WIDTHS = ((144, 4), (176, 4), (256, 4), (384, 6), (512, 8), (640, 8), (768, 12), (1024, 8),
           (1280, 10), (1536, 12))  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --- parameters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamCount:
    """Parameters of an ``AEDModel``, by part."""

    encoder: int
    decoder: int
    ctc_head: int

    @property
    def total(self) -> int:
        return self.encoder + self.decoder + self.ctc_head


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def subsampling_params(cfg: ModelConfig) -> int:
    if cfg.subsampling == "stacking":  # one Linear(factor * n_mels -> d_model)
        return _linear(cfg.subsampling_factor * cfg.n_mels, cfg.d_model)
    c, freq, stages = cfg.subsampling_channels, cfg.n_mels, cfg.subsampling_stages
    for _ in range(stages):
        freq = (freq + 1) // 2
    depthwise = (9 * c + c) + _linear(c, c)
    return (9 * c + c) + (stages - 1) * depthwise + _linear(c * freq, cfg.d_model)


def encoder_layer_params(cfg: ModelConfig) -> int:
    d, ff, k = cfg.d_model, cfg.ff_mult * cfg.d_model, cfg.conv_kernel
    feed_forward = 2 * d + _linear(d, ff) + _linear(ff, d)
    attention = 2 * d + _linear(d, 3 * d) + _linear(d, d)
    if cfg.encoder_positions == "rel_pos":
        attention += d * d + 2 * d  # linear_pos (no bias), pos_bias_u and pos_bias_v (H x d_head)
    # the conv module's norm: LayerNorm or BatchNorm, 2d parameters either way (BN's statistics
    # are buffers)
    conv = 2 * d + _linear(d, 2 * d) + (k * d + d) + 2 * d + _linear(d, d)
    return 2 * feed_forward + attention + conv + (2 * d if cfg.block_out_norm else 0)


def decoder_layer_params(cfg: ModelConfig) -> int:
    d, ff = cfg.dec_d_model, cfg.ff_mult * cfg.dec_d_model
    self_attn = 2 * d + _linear(d, 3 * d) + _linear(d, d)
    cross_attn = 2 * d + _linear(d, d) + _linear(d, 2 * d) + _linear(d, d)
    return self_attn + cross_attn + 2 * d + _linear(d, ff) + _linear(ff, d)


def decoder_fixed_params(cfg: ModelConfig) -> int:
    """Embedding, encoder->decoder projection, final norm and output layer."""
    d, v = cfg.dec_d_model, cfg.vocab_size
    memory_proj = _linear(cfg.d_model, d) if d != cfg.d_model else 0
    output = v if cfg.tie_embeddings else _linear(d, v)
    embed_norm = 2 * d if cfg.absolute_token_positions else 0
    return v * d + embed_norm + memory_proj + 2 * d + output


def count_parameters(cfg: ModelConfig) -> ParamCount:
    return ParamCount(
        encoder=subsampling_params(cfg)
        + cfg.encoder_layers * encoder_layer_params(cfg)
        + (0 if cfg.block_out_norm else 2 * cfg.d_model),  # the final norm
        decoder=decoder_fixed_params(cfg) + cfg.decoder_layers * decoder_layer_params(cfg),
        ctc_head=_linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_weight > 0 else 0,
    )


# --- FLOPs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one utterance, by part (2 per multiply-add)."""

    encoder_dense: int
    """Subsampling (convolutions, or stacking's one linear map) and all encoder matmuls except
    attention scores."""
    encoder_attention: int
    """Encoder ``QKᵀ`` and ``PV`` (quadratic in encoder frames)."""
    decoder_dense: int
    """Decoder matmuls (incl. cross-attention K/V of the encoder frames and the output layer)."""
    decoder_attention: int
    """Decoder causal self-attention and cross-attention scores (counted as dense)."""
    ctc_head: int

    @property
    def forward(self) -> int:
        return (
            self.encoder_dense + self.encoder_attention + self.decoder_dense
            + self.decoder_attention + self.ctc_head
        )  # fmt: skip

    @property
    def training(self) -> int:
        return 3 * self.forward


def count_flops(cfg: ModelConfig, frames: int, tokens: int) -> FlopCount:
    """Forward FLOPs of one utterance of ``frames`` input frames and ``tokens`` decoder tokens."""
    c, d, k = cfg.subsampling_channels, cfg.d_model, cfg.conv_kernel
    te = cfg.encoder_length(frames)
    if cfg.subsampling == "stacking":  # one matmul: (T', factor * n_mels) x (factor * n_mels, D)
        sub = te * cfg.subsampling_factor * cfg.n_mels * d
    else:
        t, freq, sub = frames, cfg.n_mels, 0
        for stage in range(cfg.subsampling_stages):
            t, freq = (t + 1) // 2, (freq + 1) // 2
            sub += t * freq * c * 9 if stage == 0 else t * freq * (c * 9 + c * c)
        sub += t * c * freq * d
    ff = cfg.ff_mult * d
    enc_per_frame = 2 * (2 * d * ff) + 4 * d * d + (2 * d * d + k * d + d * d)
    dd, fd, v, n = cfg.dec_d_model, cfg.ff_mult * cfg.dec_d_model, cfg.vocab_size, tokens
    dec_per_token = 4 * dd * dd + 2 * dd * dd + 2 * dd * fd
    dec_per_frame = 2 * dd * dd
    memory_proj = te * d * dd if dd != d else 0
    return FlopCount(
        encoder_dense=2 * (sub + cfg.encoder_layers * te * enc_per_frame),
        encoder_attention=2 * cfg.encoder_layers * 2 * te * te * d,
        decoder_dense=2
        * (
            cfg.decoder_layers * (n * dec_per_token + te * dec_per_frame) + memory_proj + n * dd * v
        ),  # fmt: skip
        decoder_attention=2 * cfg.decoder_layers * 2 * (n * n + n * te) * dd,
        ctc_head=2 * te * d * v if cfg.ctc_weight > 0 else 0,
    )


def training_flops_per_audio_second(
    cfg: ModelConfig,
    duration: float = 10.0,
    tokens_per_second: float = 4.0,
    prompt_tokens: int = PROMPT_TOKENS,
) -> float:
    """Training FLOPs per second of audio, for utterances of ``duration`` seconds with
    ``tokens_per_second`` text tokens after a ``prompt_tokens`` prompt (the tokenizer's)."""
    frames = num_input_frames(duration)
    tokens = prompt_tokens + round(tokens_per_second * duration)
    return count_flops(cfg, frames, tokens).training / duration


# --- planner --------------------------------------------------------------------------------------
def config_from_budget(params: float, encoder_share: float = 0.85, **overrides) -> ModelConfig:
    """A config of about ``params`` parameters, ``encoder_share`` of them in the encoder.

    The width is the largest of a fixed ladder that still leaves the encoder at least
    ``max(4, d_model / 48)`` layers deep (deep-and-narrow trains better than shallow-and-wide at a
    fixed size; the rule recovers Canary's widths: 512 at ~180M, 1024 at ~1B). Layer counts then
    fill each part's share (at least one decoder layer). ``overrides`` fix other fields (vocab,
    channels, ...) and may fix ``d_model``/``encoder_heads`` too.
    """
    if params <= 0:
        raise UserError(f"parameter budget must be > 0, got {params}")
    if not 0.0 < encoder_share < 1.0:
        raise UserError(f"encoder share must be in (0, 1), got {encoder_share}")
    widths = _WIDTHS
    if "d_model" in overrides:
        d = overrides["d_model"]
        widths = ((d, overrides.get("encoder_heads", max(2, d // 64))),)
    best = None
    for d, heads in widths:
        base = ModelConfig(**{"encoder_heads": heads, **overrides, "d_model": d,
                              "encoder_layers": 0, "decoder_layers": 0})  # fmt: skip
        enc_layers = round(
            (encoder_share * params - subsampling_params(base)) / encoder_layer_params(base)
        )
        dec_layers = max(
            1,
            round(((1 - encoder_share) * params - decoder_fixed_params(base) - count_parameters(
                base).ctc_head) / decoder_layer_params(base)),
        )  # fmt: skip
        if best is None or enc_layers >= max(4, d / 48):
            best = replace(base, encoder_layers=max(1, enc_layers), decoder_layers=dec_layers)
    return best


# --- command --------------------------------------------------------------------------------------
def describe(
    cfg: ModelConfig, duration: float, tokens_per_second: float, prompt_tokens: int = PROMPT_TOKENS
) -> dict:
    """Everything ``model info`` prints about one config (``prompt_tokens``: the tokenizer's)."""
    p = count_parameters(cfg)
    frames = num_input_frames(duration)
    flops = count_flops(cfg, frames, prompt_tokens + round(tokens_per_second * duration))
    return {
        "params_encoder": p.encoder,
        "params_decoder": p.decoder,
        "params_ctc_head": p.ctc_head,
        "params_total": p.total,
        "encoder_share": p.encoder / max(p.total, 1),
        "train_gflops_per_audio_second": flops.training / duration / 1e9,
        "train_flops_breakdown": {k: v * 3 / duration for k, v in asdict(flops).items()},
        "prompt_tokens": prompt_tokens,
        "config": asdict(cfg),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets", nargs="*", metavar="PRESET",
        help=f"presets to describe (default: all): {', '.join(PRESETS)}",
    )  # fmt: skip
    parser.add_argument("--budget", help="plan a config of this many parameters (e.g. 180M)")
    parser.add_argument("--encoder-share", type=float, default=0.85,
                        help="fraction of the budget in the encoder (with --budget)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0,
                        help="utterance length assumed for attention FLOPs, seconds")  # fmt: skip
    parser.add_argument("--tokens-per-second", type=float, default=4.0,
                        help="text tokens per second assumed for decoder FLOPs")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_overrides(
        parser, {"model": ModelConfig}, "--model.vocab_size=1024", deprecated_set_section="model"
    )


def run(args: argparse.Namespace) -> int:
    overrides = args.overrides.section("model")
    configs: dict[str, ModelConfig] = {}
    try:
        if args.budget:
            name = f"budget-{args.budget}"
            configs[name] = config_from_budget(
                parse_count(args.budget, "--budget"), args.encoder_share, **overrides
            )
        for name in args.presets or ([] if args.budget else list(PRESETS)):
            configs[name] = preset(name, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    info = {
        name: describe(cfg, args.duration, args.tokens_per_second, preset_prompt_tokens(name))
        for name, cfg in configs.items()
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    header = (
        f"{'model':<20} {'enc layers':>10} {'dec layers':>10} {'d_model':>8} {'encoder':>9} "
        f"{'decoder':>9} {'total':>9} {'published (ours vs)':>18} {'train GFLOP/s audio':>20}"
    )
    print(header)
    for name, row in info.items():
        cfg = configs[name]
        published = PUBLISHED_PARAMS.get(name)
        dims = f"{cfg.d_model}" + (f"/{cfg.dec_d_model}" if cfg.dec_d_model != cfg.d_model else "")
        print(
            f"{name:<20} {cfg.encoder_layers:>10} {cfg.decoder_layers:>10} {dims:>8} "
            f"{human_count(row['params_encoder']):>9} {human_count(row['params_decoder']):>9} "
            f"{human_count(row['params_total']):>9} "
            f"{_versus(row['params_total'], published):>18} "
            f"{row['train_gflops_per_audio_second']:>20.2f}"
        )
    prompts = sorted({(preset_prompt_tokens(n), PRESET_PROMPT_FORMATS.get(n, "speedasr"))
                      for n in configs})  # fmt: skip
    print(
        f"\nFLOPs: matmuls + convolutions, training = 3x forward, {args.duration:g} s utterances "
        f"with {args.tokens_per_second:g} text tokens/s + the prompt of the model's tokenizer ("
        + ", ".join(f"{fmt}: {n} tokens" for n, fmt in prompts)
        + ")."
    )
    return 0


def _versus(ours: int, published: float | None) -> str:
    """``"883M (-3.1%)"``: the published figure and how far our count is from it."""
    return "-" if published is None else f"{human_count(published)} ({ours / published - 1:+.1%})"
