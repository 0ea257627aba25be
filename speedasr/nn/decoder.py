"""Transformer decoder (pre-LN): causal self-attention, cross-attention to the encoder, FFN.

Packed: tokens ``(ΣL,)`` with their ``PackedLayout``; the encoder memory ``(ΣT', D)`` with its own.
Cross-attention pairs query segment i (tokens of utterance i) with key segment i (frames of
utterance i) through separate ``cu_seqlens``. Padded: ``(B, L)`` tokens, ``(B, T', D)`` memory.
Positions: rotary in self-attention (reset per utterance). Optionally, fixed sinusoidal absolute
positions on the token embeddings (then a LayerNorm: Canary's decoder embedding) and on the encoder
output that cross-attention reads (``speedasr.nn.positions``); without them cross-attention can
align tokens to frames by content only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedasr.nn.conformer import FeedForward, SelfAttention
from speedasr.nn.guided_attention import AlignmentPrior
from speedasr.nn.layout import Layout
from speedasr.nn.positions import sinusoidal_positions
from speedasr.nn.rotary import apply_rotary


class CrossAttention(nn.Module):
    """Queries from decoder tokens, keys/values from the encoder frames of the same utterance."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, d_model // heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, layout: Layout, memory: torch.Tensor, memory_layout: Layout,
        prior: AlignmentPrior | None = None,
    ) -> torch.Tensor:  # fmt: skip
        q = self.q(x).unflatten(-1, (self.heads, self.head_dim))
        k, v = self.kv(memory).unflatten(-1, (2, self.heads, self.head_dim)).unbind(-3)
        if prior is not None:  # training only: a loss on this call's attention weights
            prior.add(q, k)
        return self.proj(layout.attend(q, k, v, memory_layout, causal=False).flatten(-2))

    # Incremental decoding (speedasr.decoding): keys/values of the encoder output are computed once.
    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``memory: (B, T', D)`` -> ``k, v: (B, H, T', Dh)``."""
        k, v = self.kv(memory).unflatten(-1, (2, self.heads, self.head_dim)).unbind(-3)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward_cached(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """``x: (B, S, D)`` attends to ``memory_kv`` output; ``key_mask: (B, 1, 1, T')``, boolean
        (True at real frames) or additive (0 / -inf); every row needs one real key (see
        ``speedasr.decoding.cache``)."""
        q = self.q(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=key_mask)
        return self.proj(out.to(x.dtype).transpose(1, 2).flatten(-2))


class DecoderBlock(nn.Module):
    def __init__(
        self, d_model: int, heads: int, d_ff: int, dropout: float, rope_base: float = 10000.0,
        rotary: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(
            d_model, heads, causal=True, rope_base=rope_base, rotary=rotary
        )
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = CrossAttention(d_model, heads)
        self.ff_norm = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout, activation="relu")
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, layout: Layout, memory: torch.Tensor, memory_layout: Layout,
        prior: AlignmentPrior | None = None,
    ) -> torch.Tensor:  # fmt: skip
        x = x + self.dropout(self.self_attn(self.self_norm(x), layout))
        cross = self.cross_attn(self.cross_norm(x), layout, memory, memory_layout, prior)
        x = x + self.dropout(cross)
        return x + self.dropout(self.ff(self.ff_norm(x)))

    def forward_cached(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        self_kv: tuple[torch.Tensor, torch.Tensor],
        write_index: tuple[torch.Tensor, torch.Tensor],
        self_mask: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Incremental forward (inference: no dropout) of ``S`` new positions ``x: (B, S, D)``.

        rotary: ``cos, sin: (B, S, Dh/2)`` at the new positions (continuing after the cached ones,
            so they match the full forward). self_kv: this block's cache ``k, v: (B, H, L, Dh)``,
            in ``x``'s dtype or wider (attention runs in the cache's dtype); the new keys/values
            are written in place at slots ``write_index = (rows, cols)``, both ``(B, S)``, before
            attending. self_mask: ``(B, 1, S, L')``, True (or 0 if additive)
            where a new position may attend to a slot (``L' <= L``: only slots in use are read).
            cross_kv, cross_mask: ``CrossAttention.memory_kv`` of the encoder output and its
            ``(B, 1, 1, T')`` mask.
        """
        attn = self.self_attn
        qkv = attn.qkv(self.self_norm(x)).unflatten(-1, (3, attn.heads, attn.head_dim))
        qk = qkv[:, :, :2]
        if attn.rotary:
            cos, sin = rotary
            qk = apply_rotary(qk, cos[:, :, None], sin[:, :, None])  # q and k in one call
        k_cache, v_cache = self_kv
        k_cache[write_index[0], :, write_index[1]] = qk[:, :, 1].to(k_cache.dtype)
        v_cache[write_index[0], :, write_index[1]] = qkv[:, :, 2].to(v_cache.dtype)
        used = self_mask.shape[-1]
        out = F.scaled_dot_product_attention(
            qk[:, :, 0].transpose(1, 2).to(k_cache.dtype), k_cache[:, :, :used],
            v_cache[:, :, :used], attn_mask=self_mask,
        )  # fmt: skip
        x = x + attn.proj(out.to(x.dtype).transpose(1, 2).flatten(-2))
        x = x + self.cross_attn.forward_cached(self.cross_norm(x), *cross_kv, cross_mask)
        return x + self.ff(self.ff_norm(x))


class TransformerDecoder(nn.Module):
    """Token embedding -> ``layers`` blocks -> LayerNorm -> output projection to the vocabulary.

    ``hidden(...)`` returns the final normalized states; ``logits(h)`` projects them (callers that
    need only some positions, e.g. the loss, project only those). ``embed_tokens`` and
    ``project_memory`` are the two entry points the KV cache shares with ``hidden``.

    Args:
        token_positions: add sinusoidal positions to the token embeddings, then a LayerNorm
            (NeMo's ``TransformerEmbedding``, as in Canary).
        token_position_scale: what the sinusoids are multiplied by; None: 1 / √d (Canary's).
        self_rotary: rotary positions in self-attention; False: none (Canary's decoder, with
            ``token_positions``).
        memory_positions: add sinusoidal positions (unscaled: the encoder output is normalized to
            unit scale) to the encoder output, after the width projection.
    """

    def __init__(
        self, vocab_size: int, d_model: int, layers: int, heads: int, d_ff: int, dropout: float,
        memory_dim: int, tie_embeddings: bool = True, rope_base: float = 10000.0,
        token_positions: bool = False, memory_positions: bool = False,
        token_position_scale: float | None = None, self_rotary: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.embed_norm = nn.LayerNorm(d_model) if token_positions else None
        self.memory_positions = memory_positions
        self.token_position_scale = (
            d_model**-0.5 if token_position_scale is None else token_position_scale
        )
        # Encoder and decoder widths may differ (canary-180m-flash: 512 -> 1024).
        self.memory_proj = nn.Linear(memory_dim, d_model) if memory_dim != d_model else None
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, heads, d_ff, dropout, rope_base, self_rotary)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.output.weight = self.embed.weight

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens`` -> ``(*tokens.shape, D)`` decoder inputs (before dropout); ``positions``:
        each token's index in its own sequence, broadcastable to ``tokens``."""
        x = self.embed(tokens)
        if self.embed_norm is None:
            return x
        table = sinusoidal_positions(positions, x.shape[-1]) * self.token_position_scale
        return self.embed_norm(x + table.to(x.dtype))

    def project_memory(self, memory: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(..., D_enc)`` -> what cross-attention reads ``(..., D)``.

        positions: each frame's index in its own utterance, broadcastable to ``memory[..., 0]``.
        """
        if self.memory_proj is not None:
            memory = self.memory_proj(memory)
        if self.memory_positions:
            memory = memory + sinusoidal_positions(positions, memory.shape[-1]).to(memory.dtype)
        return memory

    def hidden(
        self, tokens: torch.Tensor, layout: Layout, memory: torch.Tensor, memory_layout: Layout,
        prior: AlignmentPrior | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``tokens: (ΣL,)`` or ``(B, L)`` -> ``(ΣL, D)`` or ``(B, L, D)`` final states.

        prior: collects the guided-attention loss of every block's cross-attention (training)."""
        memory = self.project_memory(memory, memory_layout.positions)
        x = self.dropout(self.embed_tokens(tokens, layout.positions))
        for block in self.blocks:
            x = block(x, layout, memory, memory_layout, prior)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)
