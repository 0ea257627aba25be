"""CTC prefix scores for joint CTC/attention beam search (Watanabe et al., 2017).

A hybrid model's attention decoder can lose its place in a long utterance and repeat or skip a
stretch; its CTC head cannot, because CTC is monotonic and must account for every frame. Joint
decoding ranks each hypothesis ``h`` by ``(1 - λ) log p_att(h) + λ log p_ctc(h...)``, where the
CTC term is the *prefix* probability: the total probability of all label sequences that start
with ``h``. A finished hypothesis (``h`` + end-of-text) gets the probability of exactly ``h``.

For a prefix ``g`` the scorer keeps, per encoder frame ``t``, the forward variables
``r_n[t]`` (the paths over frames ``0..t`` that emit ``g`` and end in its last label) and
``r_b[t]`` (… that end in blank). Extending ``g`` by a label ``c`` (``h = g + c``):

    φ[t]     = r_b[t] (g)                     if c is g's last label (a blank must separate them)
             = r_b[t] (g) ⊕ r_n[t] (g)        otherwise
    r_n[0](h) = x[0, c] if g is empty else -inf;   r_b[0](h) = -inf
    r_n[t](h) = (r_n[t-1](h) ⊕ φ[t-1]) + x[t, c]
    r_b[t](h) = (r_n[t-1](h) ⊕ r_b[t-1](h)) + x[t, blank]
    log p_prefix(h) = r_n[0](h) ⊕ ⊕_{t≥1} (φ[t-1] + x[t, c])
    log p(exactly g) = r_n[T-1](g) ⊕ r_b[T-1](g)

(``⊕`` is log-add-exp, ``x`` the CTC head's log-probabilities.) All hypotheses and candidate
labels of a step go through one loop over frames, as batched tensor ops. Utterances of different
lengths share a padded frame axis: past an utterance's end, blank has log-probability 0 and every
label -inf, which carries each path's total unchanged to the last frame.
"""

from __future__ import annotations

import torch

from speedasr.core.segments import Segments

NEG_INF = float("-inf")


class CtcPrefixScorer:
    """Prefix scores of ``R`` growing hypotheses (rows), each over one utterance's frames.

    Args:
        log_probs: ``(ΣT', V)`` packed CTC log-probabilities of the batch.
        segments: their ``Segments`` (``B`` utterances).
        rows: ``(R,)`` the utterance of each hypothesis row (e.g. ``arange(B)`` repeated per beam).
        blank: the blank label id.

    State after ``__init__``: every row holds the empty prefix (probability 1).
    """

    def __init__(
        self, log_probs: torch.Tensor, segments: Segments, rows: torch.Tensor, blank: int
    ) -> None:
        # Padded to >= 1 frame; past an utterance's end only blank, with probability 1.
        frames = max(segments.max_seqlen, 1)
        x = log_probs.new_full((segments.batch_size, frames, log_probs.shape[-1]), NEG_INF).float()
        x[:, :, blank] = 0.0
        x[segments.segment_ids, segments.positions] = log_probs.float()
        self.x, self.x_blank, self.blank = x, x[:, :, blank], blank
        self.rows = rows
        blanks = self.x_blank[rows]  # (R, T)
        self.r_n = torch.full_like(blanks, NEG_INF)
        self.r_b = blanks.cumsum(-1)  # the empty prefix: blanks all the way
        self.prefix = torch.zeros(rows.shape[0], device=x.device)  # log p_prefix(empty) = 0
        self.last = torch.full((rows.shape[0],), -1, dtype=torch.long, device=x.device)
        self._pending: tuple[torch.Tensor, ...] | None = None

    def exact(self) -> torch.Tensor:
        """``(R,)`` log-probability that the CTC head emits exactly each row's prefix."""
        return torch.logaddexp(self.r_n[:, -1], self.r_b[:, -1])

    def extend(self, labels: torch.Tensor) -> torch.Tensor:
        """Prefix log-probabilities ``(R, M)`` of each row's prefix + each of its ``M`` candidate
        ``labels: (R, M)``. The blank label gets -inf (it is not a label sequence element).
        Remembers the new forward variables for ``select``."""
        frames = self.x.shape[1]
        time = torch.arange(frames, device=labels.device)
        # Time-major (T, R, M): every frame of the recursion reads and writes contiguous slices.
        xc = self.x[self.rows[None, :, None], time[:, None, None], labels[None]]
        xb = self.x_blank[self.rows].T[:, :, None]  # (T, R, 1)
        total = torch.logaddexp(self.r_n, self.r_b).T[:, :, None]
        repeat = (labels == self.last[:, None])[None]
        phi = torch.where(repeat, self.r_b.T[:, :, None], total)  # (T, R, M)
        r_n = torch.full_like(xc, NEG_INF)
        r_b = torch.full_like(xc, NEG_INF)
        r_n[0] = torch.where((self.last < 0)[:, None], xc[0], NEG_INF)
        for t in range(1, frames):
            torch.add(torch.logaddexp(r_n[t - 1], phi[t - 1]), xc[t], out=r_n[t])
            torch.add(torch.logaddexp(r_n[t - 1], r_b[t - 1]), xb[t], out=r_b[t])
        terms = torch.cat((r_n[:1], phi[:-1] + xc[1:]), dim=0)
        prefix = torch.logsumexp(terms, dim=0).masked_fill(labels == self.blank, NEG_INF)
        self._pending = (labels, r_n, r_b, prefix)
        return prefix

    def select(self, rows: torch.Tensor, candidates: torch.Tensor) -> None:
        """Keep, as the new rows, row ``rows[i]`` of the last ``extend`` extended by its
        candidate number ``candidates[i]``."""
        if self._pending is None:
            raise RuntimeError("select() needs a preceding extend()")
        labels, r_n, r_b, prefix = self._pending
        self.r_n, self.r_b = r_n[:, rows, candidates].T, r_b[:, rows, candidates].T
        self.prefix, self.last = prefix[rows, candidates], labels[rows, candidates]
        self.rows = self.rows[rows]
        self._pending = None
