"""Batched beam search with length normalization over the KV cache, optionally joint with CTC."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from speedasr.core.segments import Segments
from speedasr.decoding.cache import KVCache, prefill, step
from speedasr.decoding.ctc_prefix import CtcPrefixScorer
from speedasr.decoding.options import DecodingOptions


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

    Joint CTC/attention (``options.ctc_weight = λ > 0``, models with a CTC head): each beam
    proposes only its ``max(2K, 4)`` best tokens by the decoder, and end-of-text (so that a
    hypothesis that has used up its frames can always end); each proposal ``c`` of prefix
    ``g`` then scores ``(1 - λ) log p_att(c | g) + λ (log p_ctc(g + c...) - log p_ctc(g...))``
    with CTC prefix probabilities (``CtcPrefixScorer``), end-of-text the CTC probability of
    exactly ``g``. A hypothesis's total is thus ``(1 - λ) log p_att + λ log p_ctc``.
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
        ctc_weight = self.options.ctc_weight
        ctc = None
        if ctc_weight > 0:
            blank = model.cfg.pad_id
            ctc = CtcPrefixScorer(model.ctc_log_probs(enc), enc_segments, expand, blank)
            proposals = min(vocab - 1, max(2 * k, 4))  # + end-of-text
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: only the first one may expand
        history = torch.zeros(batch * k, longest, dtype=torch.long, device=device)
        utts = list(range(batch))  # original index of each active utterance
        utt_limits = limits.to(device)
        beam_offsets = torch.arange(k, device=device)
        finished: list[list[tuple[float, int, list[int]]]] = [[] for _ in range(batch)]
        for t in range(longest):
            active = len(utts)
            if ctc is None:
                per_beam, extension = vocab, logp
            else:
                att, labels = propose(logp, proposals, eot_id)  # (A·K, M + 1)
                prefix = ctc.extend(labels)
                prefix = torch.where(labels == eot_id, ctc.exact()[:, None], prefix)
                extension = (1 - ctc_weight) * att + ctc_weight * (prefix - ctc.prefix[:, None])
                per_beam = proposals + 1
            cand = scores[:, :, None] + extension.view(active, k, per_beam)
            cand = cand.view(active, k * per_beam)
            top_scores, top_index = cand.topk(2 * k, dim=-1)  # sorted, best first
            src, tok = top_index // per_beam, top_index % per_beam
            if ctc is not None:
                choice = tok  # which proposal of its beam
                tok = labels.view(active, k * per_beam).gather(1, top_index)
            is_eot = torch.zeros_like(tok, dtype=torch.bool)
            if not self.options.ignore_eot:
                is_eot = tok == eot_id
            live_rank = (~is_eot).long().cumsum(-1)  # live candidates up to and including this one
            live = ~is_eot & (live_rank <= k)
            ends = is_eot & (live_rank < k)
            pick = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)[:, :k]  # (A, K)
            scores = top_scores.gather(1, pick)
            tokens = tok.gather(1, pick)
            if ctc is not None:
                chosen = choice.gather(1, pick)
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
                if ctc is not None:
                    chosen = chosen[keep]
                history, src_rows = history[rows], src_rows[rows]
            cache = cache.select(src_rows)
            if ctc is not None:
                ctc.select(src_rows, chosen.view(-1))
            logp = F.log_softmax(step(decoder, cache, tokens.view(-1)).float(), dim=-1)
        alpha = self.options.length_penalty
        best = [
            max(hyps, key=lambda h: h[0] / h[1] ** alpha)[2] if hyps else [] for hyps in finished
        ]
        return [text[:n] for text, n in zip(best, limit, strict=True)]


def propose(logp: torch.Tensor, proposals: int, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint decoding's candidates per row of decoder log-probs ``(R, V)``: the ``proposals`` best
    tokens other than end-of-text, then end-of-text; ``(R, M + 1)`` scores and token ids. Exactly
    one end-of-text per beam keeps the search's invariant (at most ``K`` of the ``2K`` best
    candidates end a hypothesis)."""
    att, labels = logp.index_fill(
        1, torch.tensor([eot_id], device=logp.device), float("-inf")
    ).topk(proposals, dim=-1)
    eot = torch.full_like(labels[:, :1], eot_id)
    return torch.cat((att, logp[:, eot_id : eot_id + 1]), -1), torch.cat((labels, eot), -1)
