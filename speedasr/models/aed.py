"""Canary-style attention encoder-decoder: FastConformer encoder -> Transformer decoder.

One set of weights, two layouts: ``PackedBatch`` (no padding anywhere, the default) and
``PaddedBatch`` (dense ``(B, T, ...)`` tensors with masks: the classic computation, padding
included). Both give the same loss and gradients (tested), and the same as each utterance alone.

Loss: label-smoothed cross-entropy on the text tokens (prompt positions are ``IGNORE_INDEX``), mixed
with an optional CTC loss on the encoder (``ctc_weight``; blank = pad id), both averaged per token:
``loss = (1 - ctc_weight) * ce + ctc_weight * ctc``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from speedasr.core.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from speedasr.core.geometry import N_MELS, SUBSAMPLING_FACTORS, encoder_length
from speedasr.core.segments import Segments
from speedasr.nn.attention import REL_POS_BACKENDS
from speedasr.nn.conformer import ConformerEncoder
from speedasr.nn.ctc_alignment import ctc_token_frames
from speedasr.nn.decoder import TransformerDecoder
from speedasr.nn.filterbank import NemoFilterbank
from speedasr.nn.guided_attention import AlignmentPrior
from speedasr.nn.layout import Layout, PackedLayout, PaddedLayout


@dataclass
class ModelConfig:
    """Dimensions and training options of an ``AEDModel``.

    The defaults are the ``tiny`` preset (~3.6M parameters with a 256-token vocabulary); other
    presets and a parameter-budget planner live in ``speedasr.models.sizing``.
    """

    vocab_size: int = 256
    """Tokenizer vocabulary, special tokens included (set from the tokenizer at training time)."""
    pad_id: int = 0
    """Tokenizer pad id: padded token positions in padded batches, and the CTC blank."""
    n_mels: int = N_MELS
    """Input features per frame (log-mel bins). The one setting of the features: training data
    (``AsrDataset(n_mels=...)``, via the run's data module) and inference (the checkpoint's
    config) extract exactly this many bins."""
    subsampling: Literal["dw_striding", "stacking"] = "dw_striding"
    """How input frames become encoder frames: ``dw_striding`` (FastConformer's
    depthwise-separable stride-2 convolutions, Canary's; NeMo checkpoints use it) or ``stacking``
    (``subsampling_factor`` frames side by side, then one linear map: a fraction of the cost, and
    from scratch on little data it learns sooner; docs/training.md). ``export-nemo`` refuses
    ``stacking`` (NeMo has no such subsampling)."""
    subsampling_channels: int = 32
    """Channels of the convolutional subsampling (Canary: 256; 16-64 on CPU; unused by
    ``stacking``)."""
    subsampling_factor: int = 8
    """Input frames (10 ms) per encoder frame: 4, 8 (FastConformer, Canary: 80 ms) or 16, by 2, 3
    or 4 stride-2 convolutions. 4 doubles the encoder's frames and its cost, and leaves CTC room
    for fast speech with many tokens per second (docs/training.md)."""
    d_model: int = 144
    """Encoder width."""
    encoder_layers: int = 6
    """Conformer blocks."""
    encoder_heads: int = 4
    """Encoder attention heads (``d_model / encoder_heads`` must be even with rotary positions)."""
    conv_kernel: int = 9
    """Depthwise convolution kernel of the conformer conv module (odd)."""
    block_out_norm: bool = False
    """A LayerNorm at the end of every conformer block, as in the Conformer paper and NeMo (the
    Canary presets); False: a single LayerNorm after the last block, which trains from scratch
    much faster on small data (docs/training.md)."""
    encoder_positions: Literal["rotary", "rel_pos"] = "rotary"
    """Encoder self-attention positions: rotary, or Transformer-XL relative positions with a
    per-layer ``linear_pos`` and ``pos_bias_u/v`` (NeMo Canary's ``rel_pos``). The pure-PyTorch
    path and speedasr's Triton kernels compute the position term; flash-attn does not."""
    xscaling: bool = False
    """Multiply the subsampling output by √d_model before the first block (NeMo's ``xscaling``)."""
    conv_norm: Literal["layer", "batch"] = "layer"
    """Norm of the conformer conv module: LayerNorm per frame, or BatchNorm over the real frames of
    the batch (NeMo Canary). BatchNorm in training mode makes every utterance's output depend on
    the rest of its batch; eval mode (running statistics) does not (docs/architecture.md)."""
    conv_norm_frozen: bool = False
    """With ``conv_norm='batch'``: normalise with the running statistics in training too and never
    update them (fine-tuning on small batches; no utterance then affects another)."""
    decoder_layers: int = 2
    """Transformer decoder blocks."""
    decoder_d_model: int | None = None
    """Decoder width; None means ``d_model`` (a projection maps encoder outputs if they differ)."""
    decoder_heads: int | None = None
    """Decoder attention heads; None means ``encoder_heads``."""
    ff_mult: int = 4
    """Feed-forward inner size as a multiple of the width (encoder and decoder)."""
    tie_embeddings: bool = True
    """Share the decoder input embedding and output projection weights."""
    rope_base: float = 10000.0
    """Rotary embedding base (encoder and decoder self-attention)."""
    absolute_token_positions: bool = False
    """Add fixed sinusoidal positions (times ``token_position_scale``) to the decoder's token
    embeddings, then a LayerNorm (Canary's decoder embedding); rotary stays in self-attention."""
    token_position_scale: float | None = None
    """Scale of the sinusoids added to the token embeddings: None is 1 / √width (Canary's: the
    sinusoids are as large as the embeddings); 1.0 lets position dominate the embedding before
    its LayerNorm (docs/training.md)."""
    decoder_rotary: bool = True
    """Rotary positions in the decoder's self-attention; False: none, the positions are only the
    ``absolute_token_positions`` (NeMo Canary's decoder)."""
    max_decoder_positions: int | None = None
    """Most decoder positions (prompt included) decoding may reach; None: no limit. Imported NeMo
    models: ``max_sequence_length``, where NeMo's position table and its decoding end."""
    frontend: Literal["lhotse", "nemo"] = "lhotse"
    """Feature extraction: lhotse's Kaldi fbank (``AsrDataset``), or NeMo's log-mel front end
    (``speedasr.nn.filterbank.NemoFilterbank``, a module of the model whose window and filterbank
    are in the checkpoint: imported Canary models)."""
    absolute_memory_positions: bool = False
    """Add fixed sinusoidal positions to the encoder output that cross-attention reads, so the
    decoder can align tokens to frames by position as well as by content (docs/training.md)."""
    dropout: float = 0.1
    """Dropout on residual branches, feed-forward hidden units and embeddings."""
    attention_backend: Literal["auto", "torch", "triton", "flash_attn"] = "auto"
    """Packed attention backend (``speedasr.nn.attention``); padded batches use dense torch."""
    ctc_weight: float = 0.3
    """Weight of the auxiliary CTC loss on the encoder (0 disables it and its output layer)."""
    guided_attention_weight: float = 0.0
    """Weight of the diagonal guided-attention loss on the decoder's cross-attention
    (``speedasr.nn.guided_attention``): teaches a decoder trained from scratch to align tokens
    with frames early (docs/training.md). Training only; 0 turns it off (and costs nothing)."""
    guided_attention: Literal["diagonal", "ctc"] = "diagonal"
    """Where the guided-attention loss wants each token's attention: on the diagonal of the
    token x frame grid, or on the token's own frames in the CTC head's forced alignment of the
    transcript (needs ``ctc_weight > 0``; the diagonal where no alignment exists)."""
    guided_attention_sigma: float = 0.2
    """Width of the guided-attention diagonal band, as a fraction of the utterance."""
    guided_attention_frames: float = 1.5
    """Width of the band around a token's CTC-aligned frames, in encoder frames."""
    label_smoothing: float = 0.1
    """Label smoothing of the decoder cross-entropy."""

    def __post_init__(self) -> None:
        dec_d, dec_h = self.dec_d_model, self.dec_heads
        checks = [
            (self.vocab_size > 0, "vocab_size must be > 0"),
            (self.n_mels > 0, "n_mels must be > 0"),
            (0 <= self.pad_id < self.vocab_size, f"pad_id must be in [0, {self.vocab_size})"),
            (self.d_model % self.encoder_heads == 0, "d_model must be divisible by encoder_heads"),
            (
                self.encoder_positions == "rel_pos"
                or (self.d_model // self.encoder_heads) % 2 == 0,
                "encoder head dim must be even (rotary)",
            ),
            (
                self.encoder_positions in ("rotary", "rel_pos"),
                "encoder_positions must be 'rotary' or 'rel_pos'",
            ),
            (
                self.encoder_positions != "rel_pos" or self.attention_backend in REL_POS_BACKENDS,
                f"encoder_positions='rel_pos' needs attention_backend {REL_POS_BACKENDS} (the "
                f"{self.attention_backend} backend does not compute relative positions)",
            ),
            (self.conv_norm in ("layer", "batch"), "conv_norm must be 'layer' or 'batch'"),
            (
                not self.conv_norm_frozen or self.conv_norm == "batch",
                "conv_norm_frozen needs conv_norm='batch' (LayerNorm has no statistics to freeze)",
            ),
            (dec_d % dec_h == 0, "decoder width must be divisible by decoder heads"),
            (
                not self.decoder_rotary or (dec_d // dec_h) % 2 == 0,
                "decoder head dim must be even (rotary)",
            ),
            (self.frontend in ("lhotse", "nemo"), "frontend must be 'lhotse' or 'nemo'"),
            (
                self.max_decoder_positions is None or self.max_decoder_positions > 0,
                "max_decoder_positions must be > 0 (or None: no limit)",
            ),
            (self.conv_kernel % 2 == 1, "conv_kernel must be odd"),
            (
                self.subsampling in ("dw_striding", "stacking"),
                f"subsampling must be 'dw_striding' or 'stacking', not {self.subsampling!r}",
            ),
            (
                self.subsampling_factor in SUBSAMPLING_FACTORS,
                f"subsampling_factor must be one of {sorted(SUBSAMPLING_FACTORS)}",
            ),
            (self.encoder_layers >= 0 and self.decoder_layers >= 0, "layer counts must be >= 0"),
            (0.0 <= self.ctc_weight <= 1.0, "ctc_weight must be in [0, 1]"),
            (self.guided_attention_weight >= 0, "guided_attention_weight must be >= 0"),
            (self.guided_attention_sigma > 0, "guided_attention_sigma must be > 0"),
            (self.guided_attention_frames > 0, "guided_attention_frames must be > 0"),
            (
                self.guided_attention in ("diagonal", "ctc"),
                "guided_attention must be 'diagonal' or 'ctc'",
            ),
            (
                self.guided_attention != "ctc" or self.ctc_weight > 0,
                "guided_attention='ctc' aligns with the CTC head: it needs ctc_weight > 0",
            ),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (
                self.token_position_scale is None or self.token_position_scale > 0,
                "token_position_scale must be > 0 (or None: 1 / sqrt(width))",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {message} (got {self})")

    @property
    def subsampling_stages(self) -> int:
        """Stride-2 convolutions of the subsampling: log2 of ``subsampling_factor``."""
        return SUBSAMPLING_FACTORS[self.subsampling_factor]

    def encoder_length(self, num_frames: int) -> int:
        """Encoder frames of an input of ``num_frames`` feature frames."""
        return encoder_length(num_frames, self.subsampling_stages)

    def with_vocabulary(self, tokenizer) -> ModelConfig:
        """This config with ``tokenizer``'s vocabulary size and padding id: the one place a run's
        model config takes its vocabulary from the tokenizer (train, calibrate)."""
        return replace(self, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)

    @property
    def dec_d_model(self) -> int:
        return self.decoder_d_model or self.d_model

    @property
    def dec_heads(self) -> int:
        return self.decoder_heads or self.encoder_heads


@dataclass
class AEDOutput:
    """What one forward pass returns (losses are means per token, fp32 scalars)."""

    loss: torch.Tensor
    """Training objective: ``(1 - ctc_weight) * ce_loss + ctc_weight * ctc_loss``
    ``+ guided_attention_weight * guide_loss``."""
    ce_loss: torch.Tensor
    """Label-smoothed cross-entropy per target token (text tokens + end-of-text)."""
    ctc_loss: torch.Tensor | None
    """CTC loss per text token on the encoder, or None when ``ctc_weight == 0``."""
    num_target_tokens: int
    """Tokens the cross-entropy averaged over (for token-weighted logging across batches)."""
    num_encoder_frames: int
    """Real encoder frames computed (padding excluded)."""
    guide_loss: torch.Tensor | None = None
    """Guided-attention cost per target row (``speedasr.nn.guided_attention``), or None when
    ``guided_attention_weight == 0``."""


class AEDModel(nn.Module):
    """FastConformer encoder + Transformer decoder (+ CTC head). ``forward(batch) -> AEDOutput``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(
            n_mels=cfg.n_mels, subsampling_channels=cfg.subsampling_channels, d_model=cfg.d_model,
            layers=cfg.encoder_layers, heads=cfg.encoder_heads, d_ff=cfg.ff_mult * cfg.d_model,
            kernel_size=cfg.conv_kernel, dropout=cfg.dropout, rope_base=cfg.rope_base,
            attention_backend=cfg.attention_backend, block_out_norm=cfg.block_out_norm,
            positions=cfg.encoder_positions, xscaling=cfg.xscaling, conv_norm=cfg.conv_norm,
            conv_norm_frozen=cfg.conv_norm_frozen, subsampling_factor=cfg.subsampling_factor,
            subsampling=cfg.subsampling,
        )  # fmt: skip
        self.decoder = TransformerDecoder(
            vocab_size=cfg.vocab_size, d_model=cfg.dec_d_model, layers=cfg.decoder_layers,
            heads=cfg.dec_heads, d_ff=cfg.ff_mult * cfg.dec_d_model, dropout=cfg.dropout,
            memory_dim=cfg.d_model, tie_embeddings=cfg.tie_embeddings, rope_base=cfg.rope_base,
            token_positions=cfg.absolute_token_positions,
            token_position_scale=cfg.token_position_scale,
            memory_positions=cfg.absolute_memory_positions, self_rotary=cfg.decoder_rotary,
        )  # fmt: skip
        self.ctc_head = nn.Linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_weight > 0 else None
        self.frontend = NemoFilterbank(cfg.n_mels) if cfg.frontend == "nemo" else None

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.decoder.embed.weight.dtype

    # --- encoder ----------------------------------------------------------------------------------
    def encode(
        self, features: torch.Tensor, feature_segments: Segments
    ) -> tuple[torch.Tensor, Segments]:
        """Packed: ``features (ΣT, n_mels)`` -> ``enc (ΣT', D)`` and its descriptor.

        Features are cast to the weights' dtype (a model cast to bfloat16 for inference takes the
        float32 features every loader produces; under autocast the weights stay float32)."""
        features = self._model_input(features)
        enc, layout = self.encoder.forward_packed(features, feature_segments)
        return enc, layout.segments

    def encode_padded(
        self, features: torch.Tensor, feature_segments: Segments
    ) -> tuple[torch.Tensor, Segments]:
        """Padded: ``features (B, T, n_mels)`` -> ``enc (B, T', D)`` (junk past each length)."""
        features = self._model_input(features)
        enc, layout = self.encoder.forward_padded(features, feature_segments)
        return enc, layout.segments

    def _model_input(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` in the weights' dtype, after checking their width: features of another
        mel-bin count would otherwise fail as a matmul shape error deep in the subsampling."""
        if features.shape[-1] != self.cfg.n_mels:
            raise ValueError(
                f"features have {features.shape[-1]} mel bins per frame, but this model reads "
                f"n_mels={self.cfg.n_mels}: extract them with the model config's n_mels "
                "(AsrDataset(tokenizer, n_mels=config.n_mels))"
            )
        return features.to(self.weight_dtype)

    # --- decoder ----------------------------------------------------------------------------------
    def decode_logits(
        self,
        tokens: torch.Tensor,
        token_segments: Segments,
        enc: torch.Tensor,
        enc_segments: Segments,
    ) -> torch.Tensor:
        """Logits of the decoder over ``enc``, in the layout of ``tokens``.

        Packed: ``tokens (ΣL,)``, ``enc (ΣT', D)`` -> ``(ΣL, V)``.
        Padded: ``tokens (B, L)``, ``enc (B, T', D)`` -> ``(B, L, V)``.
        """
        return self.decoder.logits(self._decoder_hidden(tokens, token_segments, enc, enc_segments))

    def _layouts(
        self,
        tokens: torch.Tensor,
        token_segments: Segments,
        enc: torch.Tensor,
        enc_segments: Segments,
    ) -> tuple[Layout, Layout]:
        if tokens.ndim == 1:
            backend = self.cfg.attention_backend
            return PackedLayout(token_segments, backend), PackedLayout(enc_segments, backend)
        return (
            PaddedLayout(token_segments, tokens.shape[1]),
            PaddedLayout(enc_segments, enc.shape[1]),
        )

    def _decoder_hidden(
        self, tokens, token_segments, enc, enc_segments, prior=None
    ) -> torch.Tensor:
        tok_layout, enc_layout = self._layouts(tokens, token_segments, enc, enc_segments)
        return self.decoder.hidden(tokens, tok_layout, enc, enc_layout, prior)

    def _alignment_prior(
        self, batch, enc_segments: Segments, ctc_log_probs, text, text_lengths
    ) -> AlignmentPrior | None:
        cfg = self.cfg
        if cfg.guided_attention_weight == 0:
            return None
        centres = aligned = None
        if cfg.guided_attention == "ctc" and ctc_log_probs is not None:
            text_segments = Segments.from_lengths(text_lengths, device=text.device)
            centres, aligned = ctc_token_frames(
                ctc_log_probs, torch.tensor(enc_segments.lengths, device=text.device),
                text_segments.pad(text, value=cfg.pad_id),
                torch.tensor(text_lengths, device=text.device), blank=cfg.pad_id,
            )  # fmt: skip
        return AlignmentPrior(
            batch.token_segments, enc_segments, batch.prompt_lengths,
            cfg.guided_attention_sigma, centres, aligned, cfg.guided_attention_frames,
        )  # fmt: skip

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch: PackedBatch | PaddedBatch) -> AEDOutput:
        has_ctc = self.ctc_head is not None
        ts = batch.token_segments
        if isinstance(batch, PackedBatch):
            enc, enc_segments = self.encode(batch.features, batch.feature_segments)
            ctc_log_probs = enc_segments.pad(self.ctc_log_probs(enc)) if has_ctc else None
            tokens = batch.tokens
        elif isinstance(batch, PaddedBatch):
            enc, enc_segments = self.encode_padded(batch.features, batch.feature_segments)
            ctc_log_probs = self.ctc_log_probs(enc) if has_ctc else None
            tokens = ts.unpad(batch.tokens)
        else:
            raise TypeError(f"expected PackedBatch or PaddedBatch, got {type(batch).__name__}")
        # CTC targets: the text tokens of each utterance (its decoder input after the prompt)
        text = tokens[ts.positions >= _per_row(batch.prompt_lengths, ts)]
        text_lengths = [
            n - p for n, p in zip(batch.token_segments.lengths, batch.prompt_lengths, strict=True)
        ]
        prior = self._alignment_prior(batch, enc_segments, ctc_log_probs, text, text_lengths)
        hidden = self._decoder_hidden(batch.tokens, ts, enc, enc_segments, prior)
        if isinstance(batch, PackedBatch):
            # Only target positions are projected to the vocabulary (prompt rows carry no loss).
            keep = batch.targets != IGNORE_INDEX
            logits, targets = self.decoder.logits(hidden[keep]), batch.targets[keep]
        else:
            logits = self.decoder.logits(hidden).flatten(0, 1)  # padding included: the padded cost
            targets = batch.targets.flatten()

        num_targets = int((targets != IGNORE_INDEX).sum())
        ce = F.cross_entropy(
            _at_least_fp32(logits), targets, ignore_index=IGNORE_INDEX,
            label_smoothing=self.cfg.label_smoothing, reduction="sum",
        ) / max(num_targets, 1)  # fmt: skip
        ctc = None
        loss = ce
        if ctc_log_probs is not None:
            if ctc_log_probs.shape[1] == 0:  # no encoder frame in the batch: nothing to align
                ctc = ctc_log_probs.sum() * 0.0
            else:
                # zero_infinity: an utterance whose text cannot fit its frames adds 0, not inf
                ctc = F.ctc_loss(
                    ctc_log_probs.transpose(0, 1), text, list(enc_segments.lengths), text_lengths,
                    blank=self.cfg.pad_id, reduction="sum", zero_infinity=True,
                ) / max(sum(text_lengths), 1)  # fmt: skip
            w = self.cfg.ctc_weight
            loss = (1 - w) * ce + w * ctc
        guide = prior.loss() if prior is not None else None
        if guide is not None:
            loss = loss + self.cfg.guided_attention_weight * guide
        return AEDOutput(
            loss=loss, ce_loss=ce, ctc_loss=ctc, num_target_tokens=num_targets,
            num_encoder_frames=enc_segments.total, guide_loss=guide,
        )  # fmt: skip

    def ctc_log_probs(self, enc: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` -> ``(..., V)`` float32 log-probabilities of the CTC head.

        torch's CTC loss wants them padded ``(T', B, V)``: the packed path pads these (and only
        these) after the projection."""
        if self.ctc_head is None:
            raise ValueError("this model has no CTC head (it was trained with ctc_weight 0)")
        return F.log_softmax(_at_least_fp32(self.ctc_head(enc)), dim=-1)


def _per_row(values: tuple[int, ...], segments: Segments) -> torch.Tensor:
    """Broadcast one host int per sequence to its packed rows: ``(ΣL,)``."""
    return torch.tensor(values, device=segments.positions.device)[segments.segment_ids]


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 under mixed precision; fp64 stays fp64 (tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
