"""Batched beam search with length normalization over the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedasr.decoding.cache import KVCache, prefill, step
from speedasr.decoding.options import DecodingOptions
from speedasr.nn.segments import Segments


class BeamSearch:
    """``K = beam_size`` hypotheses per utterance, all utterances in one ``(A·K, ...)`` batch.

    Per step, for each active utterance: the ``2K`` best extensions of its ``K`` beams (one topk
    over ``K·V`` scores). Walking them best first, an end-of-text candidate ranked before the
    ``K``-th live one finishes a hypothesis; the first ``K`` others stay live (at most ``K``
    candidates end with end-of-text, so ``K`` live ones always exist). An utterance stops when it
    has ``K`` finished hypotheses or reaches its length limit (its live beams then count as
    finished); the winner maximizes ``logprob / length ** length_penalty``. With ``K = 1`` this is
    exactly greedy search. Live-beam selection, reordering of the cache and of the token history
    are batched tensor ops; Python only runs per finishing event.
    """

    def __init__(self, options: DecodingOptions) -> None:
        self.options = options

    def search(
        self, model, enc: torch.Tensor, enc_segments: Segments, prompts: list[list[int]],
        eot_id: int, limits: torch.Tensor,
    ) -> list[list[int]]:  # fmt: skip
        """``enc: (ΣT', D)`` packed encoder output; ``limits: (B,)`` most tokens per utterance."""
        k, batch, device = self.options.beam_size, len(prompts), enc.device
        limit = limits.tolist()
        longest = max(limit, default=0)
        if longest == 0:
            return [[] for _ in range(batch)]
        decoder = model.decoder
        width = max(len(p) for p in prompts)
        cache = KVCache.allocate(decoder, enc, enc_segments, width + longest)
        logits = prefill(decoder, cache, prompts)
        vocab = logits.shape[-1]
        if vocab < 2 * k:
            raise ValueError(f"beam_size {k} needs a vocabulary of >= {2 * k} tokens, not {vocab}")
        expand = torch.arange(batch, device=device).repeat_interleave(k)
        cache = cache.select(expand)
        logp = F.log_softmax(logits.float(), dim=-1).index_select(0, expand)
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: only the first one may expand
        history = torch.zeros(batch * k, longest, dtype=torch.long, device=device)
        utts = list(range(batch))  # original index of each active utterance
        utt_limits = limits.to(device)
        beam_offsets = torch.arange(k, device=device)
        finished: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(batch)]
        for t in range(longest):
            active = len(utts)
            cand = (scores[:, :, None] + logp.view(active, k, vocab)).view(active, k * vocab)
            top_scores, top_index = cand.topk(2 * k, dim=-1)  # sorted, best first
            src, tok = top_index // vocab, top_index % vocab
            is_eot = torch.zeros_like(tok, dtype=torch.bool)
            if not self.options.ignore_eot:
                is_eot = tok == eot_id
            live_rank = (~is_eot).long().cumsum(-1)  # live candidates up to and including this one
            live = ~is_eot & (live_rank <= k)
            ends = is_eot & (live_rank < k)
            pick = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)[:, :k]  # (A, K)
            scores = top_scores.gather(1, pick)
            tokens = tok.gather(1, pick)
            src_rows = torch.arange(active, device=device)[:, None] * k + src.gather(1, pick)
            src_rows = src_rows.view(-1)
            previous, history = history, history.index_select(0, src_rows)
            history[:, t] = tokens.view(-1)

            done: set[int] = set()
            events = ends.nonzero().tolist()
            if events:
                rows = [a * k + int(s) for a, s in zip(
                    (e[0] for e in events), src[ends].tolist(), strict=True)]  # fmt: skip
                texts = previous[rows, :t].tolist()
                for (a, _), score, text in zip(
                    events, top_scores[ends].tolist(), texts, strict=True
                ):
                    u = utts[a]
                    if len(finished[u]) < k:
                        finished[u].append((score, t + 1, text))
                    if len(finished[u]) >= k:
                        done.add(a)
            at_limit = (utt_limits <= t + 1).nonzero()[:, 0].tolist()
            if at_limit:
                live_texts = history.view(active, k, longest)[at_limit, :, : t + 1].tolist()
                live_scores = scores[at_limit].tolist()
                for a, texts, beam_scores in zip(at_limit, live_texts, live_scores, strict=True):
                    if a not in done:
                        finished[utts[a]] += [
                            (s, t + 1, x) for s, x in zip(beam_scores, texts, strict=True)
                        ]
                    done.add(a)
            if len(done) == active:
                break
            if done:
                keep_list = [a for a in range(active) if a not in done]
                keep = torch.tensor(keep_list, device=device)
                utts = [utts[a] for a in keep_list]
                rows = (keep[:, None] * k + beam_offsets).view(-1)
                scores, tokens, utt_limits = scores[keep], tokens[keep], utt_limits[keep]
                history, src_rows = history[rows], src_rows[rows]
            cache = cache.select(src_rows)
            logp = F.log_softmax(step(decoder, cache, tokens.view(-1)).float(), dim=-1)
        alpha = self.options.length_penalty
        best = [
            max(hyps, key=lambda h: h[0] / h[1] ** alpha)[2] if hyps else [] for hyps in finished
        ]
        return [text[:n] for text, n in zip(best, limit, strict=True)]
