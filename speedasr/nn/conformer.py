"""FastConformer encoder: convolutional subsampling (8x; 4x, 16x), then conformer blocks.

Every module takes ``x`` and a layout (``speedasr.nn.layout``): packed ``x: (N, D)`` with
``N = Σ T'_i`` or padded ``x: (B, T', D)``. Nothing mixes utterances, with one opt-in exception:

- subsampling runs its convolutions on one zero "gapped" stream (packed) or on masked padded
  tensors; either way each utterance sees exactly the zeros it would see alone;
- the conformer convolution module uses LayerNorm by default (``conv_norm="layer"``), which never
  looks across frames. ``conv_norm="batch"`` (NeMo Canary's BatchNorm, ``speedasr.nn.batchnorm``)
  takes its statistics over the real frames of the whole batch in training mode: **then one
  utterance's output depends on the others in its batch**. In eval mode, or with
  ``conv_norm_frozen``, it uses running statistics and the rule holds again;
- self-attention positions restart at 0 for every utterance: rotary (default) or Transformer-XL
  relative positions (``positions="rel_pos"``, NeMo's ``rel_pos``, ``speedasr.nn.relpos``), whose
  term depends only on the distance inside one utterance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from speedasr.core.geometry import SUBSAMPLING_FACTORS, SUBSAMPLING_STAGES, encoder_length
from speedasr.core.segments import Segments
from speedasr.nn.batchnorm import FrameBatchNorm
from speedasr.nn.layout import Layout, PackedLayout, PaddedLayout
from speedasr.nn.relpos import RelPositionSelfAttention
from speedasr.nn.rotary import apply_rotary


class _Subsampling(nn.Module):
    """What both subsamplings share: ``stages`` halvings of the frame rate, ``out`` mapping to
    ``d_model``, and ``forward_lengths`` for padded input."""

    stages: int
    out: nn.Linear

    def output_segments(self, lengths, device) -> Segments:
        """The descriptor of the encoder frames of inputs of ``lengths`` frames."""
        return Segments.from_lengths([encoder_length(n, self.stages) for n in lengths], device)

    def forward_padded(
        self, x: torch.Tensor, segments: Segments
    ) -> tuple[torch.Tensor, Segments, int]:
        """``x: (B, T, n_mels)`` -> ``(B, T', d_model)``, the T'-frame descriptor and ``T'``
        (``forward_lengths`` with the host lengths of ``segments``)."""
        if x.shape[1] == 0:  # all utterances empty: nothing to convolve
            empty = Segments.from_lengths([0] * x.shape[0], x.device)
            return x.new_zeros(x.shape[0], 0, self.out.out_features), empty, 0
        y, _ = self.forward_lengths(x, torch.tensor(segments.lengths, device=x.device))
        return y, self.output_segments(segments.lengths, x.device), y.shape[1]


class ConvSubsampling(_Subsampling):
    """FastConformer subsampling: ``(frames, n_mels) -> (ceil(frames / factor), d_model)``.

    conv2d(1→C, 3×3, s2) + ReLU, then ``stages - 1`` times [depthwise conv2d(C, 3×3, s2) +
    pointwise conv2d(C→C) + ReLU], then a linear map of the ``C × ceil(n_mels / factor)``
    features to ``d_model`` (factor ``2 ** stages``: 8, as in Canary, by default). Every stage
    maps T frames to ``ceil(T / 2)`` (kernel 3, padding 1), so output lengths are
    ``speedasr.core.geometry.encoder_length(T, stages)``.

    Short utterances: an utterance of ``T >= 1`` frames always gives ``>= 1`` frame, computed as
    if it were alone (its receptive field, 15 input frames at 8x, is completed with zeros, never
    with a neighbour's frames); ``T = 0`` gives 0 frames.
    """

    def __init__(
        self, n_mels: int, channels: int, d_model: int, stages: int = SUBSAMPLING_STAGES
    ) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"subsampling needs at least one stage, got {stages}")
        self.stages = stages
        depthwise = [
            nn.Sequential(
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
            )
            for _ in range(stages - 1)
        ]
        self.convs = nn.ModuleList([nn.Conv2d(1, channels, 3, stride=2, padding=1), *depthwise])
        freq = n_mels
        for _ in range(stages):
            freq = (freq + 1) // 2
        self.out = nn.Linear(channels * freq, d_model)
        # He init for the ReLU convolutions, zero biases. torch's default (fan-in uniform, gain
        # 1/sqrt(3)) shrinks the signal ~3x per convolution, so that after five of them the part
        # of the output that varies over time is only 12-19% of its RMS (the rest is bias): the
        # encoder starts from a near-constant input and CTC sits on its all-blank plateau for
        # hundreds of steps (docs/training.md). He init: 59-75%.
        for module in self.convs.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward_packed(self, x: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, Segments]:
        """``x: (ΣT, n_mels)`` -> ``(ΣT', d_model)`` and the descriptor of the T' frames.

        All utterances share one stream, each starting at a multiple of ``2 ** stages`` (8 at 8x)
        and followed by enough zeros that at every stage it starts at an even offset and has a
        zero frame on each side (its conv padding). Gap frames are re-zeroed after every stage
        (bias + ReLU make them non-zero). The stream costs at most 11 extra frames per utterance
        at 8x.
        """
        lengths = segments.lengths
        device = x.device
        align, half = 2**self.stages, 2 ** (self.stages - 1)
        starts, pos = [], 0
        for n in lengths:
            starts.append(pos)
            # next start: a multiple of 2^S leaving >= 1 zero frame after this utterance at every
            # stage (at 8x: 4 * ceil(n/4) + 4 input frames suffice, see the tests)
            pos += -(-(n + half) // align) * align
        stream_length = max(pos, align)
        start = torch.tensor(starts, dtype=torch.int64, device=device)
        index = start[segments.segment_ids] + segments.positions
        stream = x.new_zeros(stream_length, x.shape[1]).index_copy(0, index, x)
        h = stream[None, None]  # (1, 1, L, F)
        stage_lengths = list(lengths)
        for s, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            stage_lengths = [encoder_length(n, num_stages=1) for n in stage_lengths]
            stage_segments = Segments.from_lengths(stage_lengths, device)
            index = (start >> (s + 1))[stage_segments.segment_ids] + stage_segments.positions
            if s < len(self.convs) - 1:
                keep = torch.zeros(h.shape[2], dtype=h.dtype, device=device)
                keep[index] = 1.0
                h = h * keep[:, None]
        rows = h[0].transpose(0, 1).index_select(0, index)  # (ΣT', C, F')
        return self.out(rows.flatten(1)), stage_segments

    def forward_lengths(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, T >= 1, n_mels)``, ``lengths: (B,)`` int64 -> ``(B, T', d_model)`` and the
        ``(B,)`` encoder lengths. Frames past each stage's lengths are zeroed before every stage,
        so they act as the conv padding the utterance would see alone. No host int is read:
        ``speedasr.export`` traces this with dynamic lengths."""
        h = x[:, None]  # (B, 1, T, F)
        for conv in self.convs:
            time = torch.arange(h.shape[2], device=h.device)
            h = h * (time[None] < lengths[:, None]).to(h.dtype)[:, None, :, None]
            h = F.relu(conv(h))
            lengths = encoder_length(lengths, num_stages=1)
        return self.out(h.transpose(1, 2).flatten(2)), lengths  # (B, T', C*F') -> (B, T', D)


class StackingSubsampling(_Subsampling):
    """Frame stacking: ``(frames, n_mels) -> (ceil(frames / factor), d_model)``.

    Each output frame is a linear map of ``factor`` consecutive input frames laid side by side
    (the last group of an utterance completed with zeros), so the output lengths are those of
    ``ConvSubsampling`` at the same factor (``encoder_length``). No frame sees another's group:
    the encoder blocks supply the context. Against the FastConformer convolutions it costs a
    fraction of the compute and, trained from scratch on little data, it leaves the CTC plateau
    sooner (docs/training.md); NeMo checkpoints use the convolutions.
    """

    def __init__(self, n_mels: int, d_model: int, stages: int = SUBSAMPLING_STAGES) -> None:
        super().__init__()
        if stages < 1:
            raise ValueError(f"subsampling needs at least one stage, got {stages}")
        self.stages = stages
        self.factor = 2**stages
        self.out = nn.Linear(self.factor * n_mels, d_model)

    def forward_packed(self, x: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, Segments]:
        """``x: (ΣT, n_mels)`` -> ``(ΣT', d_model)`` and the descriptor of the T' frames."""
        out_segments = self.output_segments(segments.lengths, x.device)
        starts = out_segments.cu_seqlens[:-1].long()[segments.segment_ids]
        group = starts + segments.positions // self.factor
        slot = segments.positions % self.factor
        stacked = x.new_zeros(out_segments.total, self.factor, x.shape[1])
        stacked[group, slot] = x
        return self.out(stacked.flatten(1)), out_segments

    def forward_lengths(
        self, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x: (B, T, n_mels)``, ``lengths: (B,)`` int64 -> ``(B, ceil(T / factor), d_model)``
        and the ``(B,)`` encoder lengths. Frames past each length are replaced by zeros first (a
        select, not a product: whatever the padding holds, even NaN, stays out), as if each
        utterance were alone. No host int is read: ``speedasr.export`` traces this."""
        batch, frames, n_mels = x.shape
        groups = (frames + self.factor - 1) // self.factor
        real = torch.arange(frames, device=x.device)[None] < lengths[:, None]
        x = torch.where(real[:, :, None], x, x.new_zeros(()))
        x = F.pad(x, (0, 0, 0, groups * self.factor - frames))
        y = self.out(x.reshape(batch, groups, self.factor * n_mels))
        return y, encoder_length(lengths, self.stages)


class FeedForward(nn.Module):
    """Position-wise ``Linear(d, ff) -> activation -> dropout -> Linear(ff, d)`` on ``(..., d)``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str = "silu") -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.activation = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(self.activation(self.up(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; causal for the decoder.

    ``x: (N, D)`` packed or ``(B, T, D)`` padded -> same shape. ``rotary=False``: no positions in
    the attention itself (NeMo's Canary decoder, whose positions are added to the embeddings).
    """

    def __init__(
        self, d_model: int, heads: int, causal: bool = False, rope_base: float = 10000.0,
        rotary: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.causal, self.rope_base = (
            heads, d_model // heads, causal, rope_base,
        )  # fmt: skip
        self.rotary = rotary
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        if self.rotary:
            cos, sin = layout.rotary(self.head_dim, self.rope_base)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = layout.attend(q, k, v, layout, causal=self.causal)
        return self.proj(out.flatten(-2))


class ConvModule(nn.Module):
    """Conformer convolution: pointwise(D→2D) → GLU → depthwise(k) → norm → SiLU → pointwise.

    ``norm="layer"``: LayerNorm normalizes each frame over its channels, no statistic crosses
    frames or utterances. ``norm="batch"``: BatchNorm over the batch's real frames (NeMo Canary;
    in training mode utterances then affect each other, see ``speedasr.nn.batchnorm``);
    ``norm_frozen`` keeps its running statistics fixed.
    """

    def __init__(
        self, d_model: int, kernel_size: int, norm: str = "layer", norm_frozen: bool = False
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(
                f"conv kernel size must be odd (same-length output), got {kernel_size}"
            )
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(
            d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model
        )
        if norm == "layer":
            self.norm = nn.LayerNorm(d_model)
        elif norm == "batch":
            self.norm = FrameBatchNorm(d_model, frozen=norm_frozen)
        else:
            raise ValueError(f"conv norm must be 'layer' or 'batch', got {norm!r}")
        self.pointwise_out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        h = F.glu(self.pointwise_in(x), dim=-1)
        h = layout.depthwise_conv(h, self.depthwise)
        h = self.norm(h, layout) if isinstance(self.norm, FrameBatchNorm) else self.norm(h)
        return self.pointwise_out(F.silu(h))


class ConformerBlock(nn.Module):
    """Macaron block: x + ½FFN, + MHSA, + conv, + ½FFN (all pre-norm), then, with ``out_norm``,
    a LayerNorm of the block output (the Conformer paper and NeMo)."""

    def __init__(
        self, d_model: int, heads: int, d_ff: int, kernel_size: int, dropout: float,
        rope_base: float = 10000.0, out_norm: bool = True, positions: str = "rotary",
        conv_norm: str = "layer", conv_norm_frozen: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.ff1_norm, self.ff1 = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        if positions == "rotary":
            attn = SelfAttention(d_model, heads, rope_base=rope_base)
        elif positions == "rel_pos":
            attn = RelPositionSelfAttention(d_model, heads)
        else:
            raise ValueError(f"encoder positions must be 'rotary' or 'rel_pos', got {positions!r}")
        self.attn_norm, self.attn = nn.LayerNorm(d_model), attn
        self.conv_norm = nn.LayerNorm(d_model)
        self.conv = ConvModule(d_model, kernel_size, conv_norm, conv_norm_frozen)
        self.ff2_norm, self.ff2 = nn.LayerNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.out_norm = nn.LayerNorm(d_model) if out_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = x + 0.5 * self.dropout(self.ff1(self.ff1_norm(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x), layout))
        x = x + self.dropout(self.conv(self.conv_norm(x), layout))
        x = x + 0.5 * self.dropout(self.ff2(self.ff2_norm(x)))
        return self.out_norm(x)


class ConformerEncoder(nn.Module):
    """Subsampling + ``layers`` conformer blocks. See ``forward_packed`` / ``forward_padded``.

    block_out_norm: a LayerNorm at the end of every block (Conformer paper, NeMo); False: one
    LayerNorm after the last block (the pre-LN Transformer arrangement), whose residual stream
    is never renormalized and which leaves its all-blank CTC plateau much sooner when trained
    from scratch on little data (docs/training.md).
    positions: ``"rotary"`` or ``"rel_pos"`` (Transformer-XL, NeMo Canary).
    xscaling: multiply the subsampling output by ``√d_model`` (NeMo's ``xscaling``).
    conv_norm, conv_norm_frozen: the conv module's norm (``ConvModule``).
    subsampling_factor: 4, 8 (Canary) or 16: frames per encoder frame (``ConvSubsampling``).
    """

    def __init__(
        self, n_mels: int, subsampling_channels: int, d_model: int, layers: int, heads: int,
        d_ff: int, kernel_size: int, dropout: float, rope_base: float = 10000.0,
        attention_backend: str = "auto", block_out_norm: bool = False, positions: str = "rotary",
        xscaling: bool = False, conv_norm: str = "layer", conv_norm_frozen: bool = False,
        subsampling_factor: int = 8, subsampling: str = "dw_striding",
    ) -> None:  # fmt: skip
        super().__init__()
        stages = SUBSAMPLING_FACTORS[subsampling_factor]
        if subsampling == "stacking":
            self.subsampling = StackingSubsampling(n_mels, d_model, stages)
        else:
            self.subsampling = ConvSubsampling(n_mels, subsampling_channels, d_model, stages)
        self.xscale = math.sqrt(d_model) if xscaling else 1.0
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(
                d_model,
                heads,
                d_ff,
                kernel_size,
                dropout,
                rope_base,
                block_out_norm,
                positions,
                conv_norm,
                conv_norm_frozen,
            )  # fmt: skip
            for _ in range(layers)
        )
        self.norm = nn.Identity() if block_out_norm else nn.LayerNorm(d_model)
        self.attention_backend = attention_backend

    def forward_packed(
        self, features: torch.Tensor, segments: Segments
    ) -> tuple[torch.Tensor, PackedLayout]:
        """``features: (ΣT, n_mels)`` -> ``(ΣT', D)``, ``T'_i = encoder_length(T_i, stages)``."""
        x, enc_segments = self.subsampling.forward_packed(features, segments)
        layout = PackedLayout(enc_segments, self.attention_backend)
        x = self.dropout(x * self.xscale if self.xscale != 1.0 else x)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x), layout

    def forward_padded(
        self, features: torch.Tensor, segments: Segments
    ) -> tuple[torch.Tensor, PaddedLayout]:
        """``features: (B, T, n_mels)`` -> ``(B, T', D)``; rows past each length are junk."""
        x, enc_segments, length = self.subsampling.forward_padded(features, segments)
        layout = PaddedLayout(enc_segments, length)
        x = self.dropout(x * self.xscale if self.xscale != 1.0 else x)
        for block in self.blocks:
            x = block(x, layout)
        return self.norm(x), layout
