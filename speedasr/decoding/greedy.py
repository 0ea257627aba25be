"""Greedy search: ``GreedySearch`` (KV cache) and the ``UncachedGreedySearch`` reference."""

from __future__ import annotations

import torch

from speedasr.core.segments import Segments
from speedasr.decoding.cache import KVCache, prefill, step
from speedasr.decoding.options import DecodingOptions


class GreedySearch:
    """Batched greedy search with a KV cache.

    Per step: one decoder call over the active rows (a few dense batched ops per block), one argmax
    and one host sync to learn whether any row finished. Finished rows are dropped from the cache
    with one gather, so later steps compute only active hypotheses; emitted tokens are kept in one
    ``(B, max_len)`` tensor and turned into lists once at the end (no per-row Python per step).
    """

    def __init__(self, options: DecodingOptions) -> None:
        self.options = options

    def search(
        self, model, enc: torch.Tensor, enc_segments: Segments, prompts: list[list[int]],
        eot_id: int, limits: torch.Tensor,
    ) -> list[list[int]]:  # fmt: skip
        """``enc: (ΣT', D)`` packed encoder output; ``limits: (B,)`` most tokens per utterance."""
        batch, device = len(prompts), enc.device
        longest = int(limits.max()) if batch else 0
        if longest == 0:
            return [[] for _ in range(batch)]
        decoder = model.decoder
        width = max(len(p) for p in prompts)
        cache = KVCache.allocate(decoder, enc, enc_segments, width + longest)
        logits = prefill(decoder, cache, prompts)
        out = torch.zeros(batch, longest, dtype=torch.long, device=device)
        emitted = torch.zeros(batch, dtype=torch.long, device=device)
        rows = torch.arange(batch, device=device)  # original index of each active row
        row_limits = limits.to(device)
        for t in range(longest):
            next_ids = logits.argmax(-1)
            eot = torch.zeros_like(next_ids, dtype=torch.bool)
            if not self.options.ignore_eot:
                eot = next_ids == eot_id
            out[rows, t] = next_ids
            emitted[rows] += (~eot).long()
            done = eot | (row_limits <= t + 1)
            finished = int(done.sum()) if t + 1 < longest else len(rows)  # the one host sync
            if finished == len(rows):
                break
            if finished:
                keep = (~done).nonzero()[:, 0]
                rows, row_limits, next_ids = rows[keep], row_limits[keep], next_ids[keep]
                cache = cache.select(keep)
            logits = step(decoder, cache, next_ids)
        counts = torch.minimum(emitted, limits.to(device)).tolist()
        return [seq[:n] for seq, n in zip(out.tolist(), counts, strict=True)]


class UncachedGreedySearch:
    """Greedy search that re-runs the packed decoder over every prefix at every step.

    No state but the token lists: the reference the cached strategies are tested against, and the
    baseline of the per-step cost in ``speedasr bench rtfx``. Cost is quadratic in output length.
    Gives exactly ``GreedySearch``'s tokens in float32; in bfloat16 on a CPU the cached path's
    attention runs in float32 (``cache_dtype``) and near-ties may break differently.
    """

    def __init__(self, options: DecodingOptions) -> None:
        self.options = options

    def search(
        self, model, enc: torch.Tensor, enc_segments: Segments, prompts: list[list[int]],
        eot_id: int, limits: torch.Tensor,
    ) -> list[list[int]]:  # fmt: skip
        device = enc.device
        enc_rows = enc_segments.split(enc)
        limit = limits.tolist()
        hyps: list[list[int]] = [[] for _ in prompts]
        active = [i for i in range(len(prompts)) if limit[i] > 0]
        while active:
            seqs = [list(prompts[i]) + hyps[i] for i in active]
            tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
            token_segments = Segments.from_lengths([len(s) for s in seqs], device)
            sub_enc = torch.cat([enc_rows[i] for i in active])
            sub_segments = Segments.from_lengths([enc_segments.lengths[i] for i in active], device)
            last = torch.tensor(token_segments.offsets[1:], device=device) - 1
            logits = model.decode_logits(tokens, token_segments, sub_enc, sub_segments)
            next_ids = logits.index_select(0, last).argmax(-1).tolist()
            still = []
            for i, tok in zip(active, next_ids, strict=True):
                if tok == eot_id and not self.options.ignore_eot:
                    continue
                hyps[i].append(tok)
                if len(hyps[i]) < limit[i]:
                    still.append(i)
            active = still
        return hyps
