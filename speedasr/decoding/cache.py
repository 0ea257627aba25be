"""The KV cache of incremental decoding, and the two decoder calls that use it.

Per decoder block, the cache holds

- self-attention keys/values ``(R, H, L, Dh)``: one row per hypothesis, ``L`` slots allocated once
  for the longest prompt + output; each step writes one slot per row in place (no reallocation);
- cross-attention keys/values ``(R, H, T', Dh)``: computed once from the packed encoder output
  (padded to the longest utterance only here, for dense batched per-step attention), never again.

Rows have different lengths (prompts differ, hypotheses stop at different steps): ``lengths (R,)``
says how many slots of each row are real and a boolean mask hides the rest. Rotary positions of
new tokens continue from each row's length, so cached decoding computes what the full (packed,
teacher-forced) forward computes. ``select(rows)`` gathers rows: beam reordering, and dropping
finished hypotheses so that later steps only compute active ones.

The cache holds keys/values in the model's dtype, except float32 on a CPU for a bfloat16/float16
model (``cache_dtype``); queries are cast to the cache's dtype and attention outputs back.

This padding is inference-time bookkeeping over at most a few hundred slots; training stays packed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speedasr.core.segments import Segments
from speedasr.nn.rotary import rotary_tables


@dataclass
class KVCache:
    """Keys/values of every decoder block for ``R`` hypothesis rows (see the module docstring)."""

    self_k: list[torch.Tensor]
    """Per block ``(R, H, L, Dh)``: rotated self-attention keys, slot j = token position j."""
    self_v: list[torch.Tensor]
    """Per block ``(R, H, L, Dh)``: self-attention values."""
    cross_k: list[torch.Tensor]
    """Per block ``(R, H, T', Dh)``: cross-attention keys of the row's encoder frames."""
    cross_v: list[torch.Tensor]
    """Per block ``(R, H, T', Dh)``: cross-attention values."""
    cross_mask: torch.Tensor
    """``(R, 1, 1, T')`` additive attention mask: 0 at real encoder frames, -inf elsewhere
    (additive rather than boolean: attention kernels take it as is, no per-step conversion)."""
    lengths: torch.Tensor
    """``(R,)`` int64: cached tokens per row (the next token goes to slot ``lengths[r]``)."""
    used: int
    """Host int >= ``max(lengths)``: slots any row may read (no device sync to know it)."""
    rotary: tuple[torch.Tensor, torch.Tensor]
    """``cos, sin: (L, Dh/2)`` for positions ``0..L-1``, computed once; a step gathers its rows."""

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.cross_mask.dtype

    @property
    def capacity(self) -> int:
        return self.self_k[0].shape[2] if self.self_k else 0

    @classmethod
    def allocate(
        cls, decoder, memory: torch.Tensor, memory_segments: Segments, capacity: int
    ) -> KVCache:
        """An empty cache for ``decoder`` (``TransformerDecoder``) over packed encoder output
        ``memory: (ΣT', D_enc)``, one row per utterance, ``capacity`` token slots per row."""
        memory = decoder.project_memory(memory, memory_segments.positions)
        dtype = cache_dtype(memory)
        batch = memory_segments.batch_size
        # Padded to >= 1 frame; padded k/v are zeroed and an utterance without frames attends to
        # one such zero slot, so its cross-attention output is exactly 0 (as in the packed path).
        frames = max(memory_segments.max_seqlen, 1)
        padded = memory.new_zeros(batch, frames, memory.shape[-1])
        padded[memory_segments.segment_ids, memory_segments.positions] = memory
        lens = torch.tensor(memory_segments.lengths, device=memory.device)
        real = torch.arange(frames, device=memory.device)[None] < lens[:, None]
        keep = real[:, None, :, None].to(dtype)
        cross_mask = _additive((real | (lens[:, None] == 0))[:, None, None, :], dtype)
        self_k, self_v, cross_k, cross_v = [], [], [], []
        for block in decoder.blocks:
            k, v = block.cross_attn.memory_kv(padded)
            cross_k.append(k.to(dtype) * keep)
            cross_v.append(v.to(dtype) * keep)
            heads, head_dim = block.self_attn.heads, block.self_attn.head_dim
            self_k.append(memory.new_zeros(batch, heads, capacity, head_dim, dtype=dtype))
            self_v.append(memory.new_zeros(batch, heads, capacity, head_dim, dtype=dtype))
        lengths = torch.zeros(batch, dtype=torch.int64, device=memory.device)
        rotary = (memory.new_zeros(capacity, 0), memory.new_zeros(capacity, 0))
        if len(decoder.blocks) and decoder.blocks[0].self_attn.rotary:
            attn = decoder.blocks[0].self_attn  # every block has the same head size and base
            slots = torch.arange(capacity, device=memory.device)
            cos, sin = rotary_tables(slots, attn.head_dim, attn.rope_base)
            rotary = (cos.to(memory.dtype), sin.to(memory.dtype))
        return cls(self_k, self_v, cross_k, cross_v, cross_mask, lengths, 0, rotary)

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of ``rows`` (``(R',)`` indices into this cache's rows; repeats allowed)."""
        pick = lambda ts: [t.index_select(0, rows) for t in ts]  # noqa: E731
        return KVCache(
            pick(self.self_k), pick(self.self_v), pick(self.cross_k), pick(self.cross_v),
            self.cross_mask.index_select(0, rows), self.lengths.index_select(0, rows), self.used,
            self.rotary,
        )  # fmt: skip


def extend(decoder, cache: KVCache, tokens: torch.Tensor, counts: torch.Tensor | None = None):
    """Feed ``tokens: (R, S)`` (right-padded when ``counts`` is given) to the decoder, appending
    their keys/values to ``cache`` in place; return the final hidden states ``(R, S, D)``.

    counts: ``(R,)`` real tokens per row (default: all ``S``). Slots of padding tokens are written
    too but lie past ``lengths``, so they are masked and overwritten by the next step.
    """
    rows, new = tokens.shape
    device = tokens.device
    if cache.used + new > cache.capacity:
        raise ValueError(f"KV cache full: {cache.used} + {new} slots > capacity {cache.capacity}")
    positions = cache.lengths[:, None] + torch.arange(new, device=device)  # (R, S)
    row_index = torch.arange(rows, device=device)[:, None].expand(rows, new)
    used = cache.used + new
    # New position s of row r sees slots j <= its own position (causal, bottom-right aligned).
    x = decoder.embed_tokens(tokens, positions)
    self_mask = _additive(
        (torch.arange(used, device=device) <= positions[..., None])[:, None], cache.dtype
    )
    rotary = (cache.rotary[0][positions], cache.rotary[1][positions])  # (R, S, Dh/2)
    for i, block in enumerate(decoder.blocks):
        x = block.forward_cached(
            x, rotary, (cache.self_k[i], cache.self_v[i]), (row_index, positions), self_mask,
            (cache.cross_k[i], cache.cross_v[i]), cache.cross_mask,
        )  # fmt: skip
    cache.lengths = cache.lengths + (new if counts is None else counts)
    cache.used = used
    return decoder.norm(x)


def cache_dtype(memory: torch.Tensor) -> torch.dtype:
    """dtype of the cached keys/values (and of attention over them) for a model computing in
    ``memory.dtype``: that dtype, except float32 on a CPU for a reduced-precision model. torch's
    fused CPU attention runs bfloat16 3-7x slower than float32 at decoding shapes (one query per
    row over tens to hundreds of keys: 16 rows x 190 keys take 1.5 ms vs 0.2 ms), while the
    matmuls of the blocks gain from bfloat16; the cache is small, so it is kept in float32 there
    and only the new rows are converted."""
    if memory.device.type == "cpu" and memory.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return memory.dtype


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive mask (0 / -inf), computed once and shared by all blocks."""
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)


def prefill(decoder, cache: KVCache, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts through an empty cache; return logits ``(R, V)`` at each one's last token."""
    device = cache.lengths.device
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [p[-1]] * (width - len(p)) for p in prompts], device=device)
    counts = torch.tensor([len(p) for p in prompts], device=device)
    hidden = extend(decoder, cache, tokens, counts)
    last = hidden[torch.arange(len(prompts), device=device), counts - 1]
    return decoder.logits(last)


def step(decoder, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per row ``tokens: (R,)``; return next-token logits ``(R, V)``."""
    return decoder.logits(extend(decoder, cache, tokens[:, None])[:, 0])
