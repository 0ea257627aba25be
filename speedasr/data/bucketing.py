"""2D bucketing: bins over (duration, decoder tokens), and how a cut's decoder tokens are counted.

A cut's shape is ``(d, L)``: ``d`` seconds of audio and ``L = prompt + text`` decoder tokens,
exactly the positions the collator builds. Duration buckets alone leave tokens padded (transcript
length varies a lot at a fixed duration), so each duration bucket is split again by tokens:

* duration buckets hold equal *total duration* (each gets the same number of batches);
* each is split into sub-buckets of equal *total tokens*;
* within a duration bucket, cuts whose tokens/second (TPS) has a z-score above a threshold are
  outliers (typically misaligned transcripts): they are left out of the estimate, and the bucket's
  max TPS is the largest TPS kept. The last token edge of a bucket is ``ceil(max_tps × d_max)``, so
  every non-outlier cut of that duration fits.

Only the high side of TPS is an outlier: a cut with few tokens for its duration costs no token
padding, a cut with too many blows up the token axis of its whole batch.

``speedasr bins --cuts CUTS --tokenizer TOK --out bins.json`` (``speedasr.data.bins_cli``) writes
the bins; training loads them (``SamplerConfig.bins``) instead of estimating again. The sampling
constraints that fill batches over these bins are ``speedasr.data.constraints`` (padded) and
``speedasr.data.packing`` (packed).
"""

from __future__ import annotations

import json
import math
import os
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lhotse.cut import Cut

from speedasr.core.geometry import PROMPT_TOKENS
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError

BINS_FORMAT = "speedasr-bins-2d"
CHARS_PER_TOKEN = 3.0
"""Token estimate without a tokenizer: one token per 3 characters (spaces included) of alphabetic
text, one per character of CJK/kana/hangul. Small sentencepiece vocabularies (256-1024 pieces, the
tiny recipes) give 2.5-4 characters per token on English and Indonesian."""

_ONE_TOKEN_PER_CHAR = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
)


def estimate_text_tokens(text: str) -> int:
    """Estimate of sentencepiece text tokens (no prompt) from characters: ``CHARS_PER_TOKEN``."""
    text = text.strip()
    if not text:
        return 0
    cjk = len(_ONE_TOKEN_PER_CHAR.findall(text))
    return cjk + math.ceil((len(text) - cjk) / CHARS_PER_TOKEN)


class TokenCounter:
    """Decoder tokens ``L`` of a cut, ``len(prompt(lang)) + len(encode(text, lang))``, as collated.

    Uses the first supervision's text and language (as the collator does; no language is
    ``"en"``): text is encoded in that language, which a NeMo aggregate tokenizer needs to pick the
    language's SentencePiece model. Without a tokenizer, ``L`` is
    ``PROMPT_TOKENS + estimate_text_tokens(text)``. Counts are cached by cut id (bounded: oldest
    entries are dropped past ``cache_size``; ``None`` keeps all), because samplers measure a cut
    many times while it waits in a bucket.

    Raises ``UserError`` for a language the tokenizer does not have; a cut without supervision
    counts as a prompt only.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, cache_size: int | None = 1 << 18):
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: dict[str, int] = {}
        self._prompt: dict[str, int] = {}

    @property
    def name(self) -> str:
        """What counts tokens: the tokenizer directory, or ``"estimate"``."""
        if self.tokenizer is None:
            return "estimate"
        return str(getattr(self.tokenizer, "directory", None) or "tokenizer")

    def prompt_tokens(self, language: str | None) -> int:
        language = language or "en"
        if self.tokenizer is None:
            return PROMPT_TOKENS
        n = self._prompt.get(language)
        if n is None:
            n = self._prompt[language] = len(self.tokenizer.prompt(language))
        return n

    def count(self, text: str | None, language: str | None) -> int:
        # The dataset's rule (dataset.reference_and_language): no language means "en", for the
        # prompt and for the text, which an aggregate tokenizer encodes with that language's model.
        language = language or "en"
        prompt = self.prompt_tokens(language)
        if self.tokenizer is None:
            return prompt + estimate_text_tokens(text or "")
        return prompt + len(self.tokenizer.encode(text or "", language))

    def __call__(self, cut: Cut) -> int:
        n = self._cache.get(cut.id)
        if n is None:
            sup = cut.supervisions[0] if cut.supervisions else None
            n = self.count(sup.text if sup else "", sup.language if sup else None)
            if self.cache_size is not None and len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]
            self._cache[cut.id] = n
        return n


# --- bins ------------------------------------------------------------------------------------


@dataclass
class BucketBins:
    """2D bucket edges. Bucket ``(i, j)`` holds cuts with ``d <= duration_edges[i]`` (and above the
    previous edge) and ``L <= token_edges[i][j]``. Buckets are numbered row by row: all token
    sub-buckets of duration bucket 0, then of 1, ...

    Attributes:
        duration_edges: upper duration edge (seconds) of each duration bucket, ascending.
        token_edges: upper token edges of the sub-buckets of each duration bucket, ascending.
        max_tps: largest non-outlier tokens/second of each duration bucket.
        meta: how the bins were made (tokenizer, counts, threshold); informative only.
    """

    duration_edges: list[float]
    token_edges: list[list[int]]
    max_tps: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.duration_edges)
        if n == 0 or len(self.token_edges) != n or len(self.max_tps) != n:
            raise ValueError("bins need one token-edge list and one max TPS per duration bucket")
        if any(not row for row in self.token_edges):
            raise ValueError("every duration bucket needs at least one token edge")
        if list(self.duration_edges) != sorted(self.duration_edges) or any(
            list(row) != sorted(row) for row in self.token_edges
        ):
            raise ValueError("bin edges must be ascending")
        self._offsets = [0]
        for row in self.token_edges:
            self._offsets.append(self._offsets[-1] + len(row))

    @property
    def num_buckets(self) -> int:
        return self._offsets[-1]

    def bucket_shape(self, index: int) -> tuple[float, int]:
        """Upper ``(duration, tokens)`` corner of flat bucket ``index``."""
        i = bisect_left(self._offsets, index + 1) - 1
        return self.duration_edges[i], self.token_edges[i][index - self._offsets[i]]

    def shapes(self) -> list[tuple[float, int]]:
        return [self.bucket_shape(k) for k in range(self.num_buckets)]

    def assign(self, duration: float, tokens: int, strict: bool = True) -> int | str:
        """Flat bucket index of a cut, or the reason it fits none.

        strict: the cut's duration bucket, rejected (``"tps_outlier"``) if its TPS exceeds that
        bucket's max. Lenient: the smallest bucket (in order) that fits both dimensions.
        Reasons: ``"too_long"`` (longer than every bucket), ``"tps_outlier"``,
        ``"too_many_tokens"``.
        """
        i = bisect_left(self.duration_edges, duration)
        if i == len(self.duration_edges):
            return "too_long"
        if strict:
            if duration > 0 and tokens / duration > self.max_tps[i] * (1 + 1e-9):
                return "tps_outlier"
            j = bisect_left(self.token_edges[i], tokens)
            if j == len(self.token_edges[i]):  # only possible for edges edited by hand
                return "tps_outlier"
            return self._offsets[i] + j
        for ii in range(i, len(self.duration_edges)):
            j = bisect_left(self.token_edges[ii], tokens)
            if j < len(self.token_edges[ii]):
                return self._offsets[ii] + j
        return "too_many_tokens"

    # --- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BINS_FORMAT,
            "version": 1,
            "buckets": [
                {"duration": d, "tokens": list(t), "max_tps": m}
                for d, t, m in zip(self.duration_edges, self.token_edges, self.max_tps, strict=True)
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BucketBins:
        if data.get("format") != BINS_FORMAT:
            raise ValueError(f"not a {BINS_FORMAT} file (format={data.get('format')!r})")
        rows = data["buckets"]
        return cls(
            duration_edges=[float(r["duration"]) for r in rows],
            token_edges=[[int(t) for t in r["tokens"]] for r in rows],
            max_tps=[float(r["max_tps"]) for r in rows],
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write atomically: data-parallel ranks may estimate and save the same file at once."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        rows = ",\n    ".join(json.dumps(b) for b in data.pop("buckets"))  # one bucket a line
        head = json.dumps(data, indent=2)[:-2]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f'{head},\n  "buckets": [\n    {rows}\n  ]\n}}\n')
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> BucketBins:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(
                f"bins file '{path}' does not exist (create it with `speedasr bins`)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"bins file '{path}' is not valid: {e}") from None


def _equal_total_splits(values: np.ndarray, num_splits: int) -> list[float]:
    """Upper edges splitting sorted ``values`` into ``<= num_splits`` groups of equal total.

    Equal values never straddle an edge (an edge is a value, membership is ``<= edge``), so
    degenerate inputs (all equal) give fewer groups instead of empty ones.
    """
    cum = np.cumsum(values, dtype=np.float64)
    total = cum[-1]
    edges = []
    for k in range(1, num_splits):
        idx = int(np.searchsorted(cum, total * k / num_splits, side="left"))
        edges.append(float(values[min(idx, len(values) - 1)]))
    edges.append(float(values[-1]))
    return sorted(set(edges))


def estimate_bins(
    lengths: Sequence[tuple[float, int]],
    num_duration_buckets: int = 30,
    num_token_buckets: int = 5,
    tps_threshold: float = 4.0,
) -> BucketBins:
    """Estimate 2D bins from ``(duration seconds, decoder tokens)`` of each cut.

    Gives at most ``num_duration_buckets × num_token_buckets`` buckets (fewer when the data has
    fewer distinct values: one cut gives one bucket). Raises ``UserError`` on no usable cut or bad
    settings.
    """
    if num_duration_buckets < 1 or num_token_buckets < 1:
        raise UserError(
            f"need at least 1 duration and 1 token bucket "
            f"(got {num_duration_buckets} x {num_token_buckets})"
        )
    if not tps_threshold > 0:
        raise UserError(f"TPS z-score threshold must be > 0 (got {tps_threshold})")
    arr = np.array([(d, t) for d, t in lengths if d > 0 and math.isfinite(d)], dtype=np.float64)
    if arr.size == 0:
        raise UserError("cannot estimate bins: no cut with a positive duration")
    arr = arr[np.argsort(arr[:, 0], kind="stable")]
    dur, tok = arr[:, 0], arr[:, 1]
    d_edges = _equal_total_splits(dur, num_duration_buckets)
    which = np.searchsorted(np.array(d_edges), dur, side="left")
    token_edges, max_tps, outliers = [], [], 0
    for i, d_max in enumerate(d_edges):
        d_i, t_i = dur[which == i], tok[which == i]
        tps = t_i / d_i
        std = tps.std()
        keep = (
            np.ones_like(tps, dtype=bool) if std == 0 else (tps - tps.mean()) / std <= tps_threshold
        )
        outliers += int((~keep).sum())
        m = float(tps[keep].max())
        edges = (
            _equal_total_splits(np.sort(t_i[keep]), num_token_buckets)
            if t_i[keep].sum() > 0
            else [0.0]
        )
        edges = [int(math.ceil(e)) for e in edges]
        # Every non-outlier cut of this duration bucket fits its last sub-bucket.
        edges[-1] = max(edges[-1], int(math.ceil(m * d_max - 1e-9)))
        token_edges.append(sorted(set(edges)))
        max_tps.append(m)
    meta = {
        "num_cuts": int(len(dur)),
        "tps_outliers": outliers,
        "tps_threshold": tps_threshold,
        "requested": [num_duration_buckets, num_token_buckets],
        "total_seconds": float(dur.sum()),
    }
    return BucketBins([float(d) for d in d_edges], token_edges, max_tps, meta)


def measure_cuts(
    cuts: Iterable[Cut], counter: TokenCounter
) -> tuple[list[tuple[float, int]], dict]:
    """``(duration, tokens)`` of every usable cut, and counts of the skipped ones by reason."""
    lengths, skipped = [], {}
    for cut in cuts:
        reason = basic_reject_reason(cut, counter)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        lengths.append((float(cut.duration), counter(cut)))
    return lengths, skipped


def basic_reject_reason(cut: Cut, counter: TokenCounter | None) -> str | None:
    """Why no model can train on ``cut`` (``None`` if it is usable): no supervision, no audio,
    or a language the tokenizer lacks."""
    if not cut.supervisions:
        return "no_supervision"
    if not cut.duration > 0:
        return "empty"
    if counter is not None and counter.tokenizer is not None:
        lang = cut.supervisions[0].language or "en"
        if lang not in counter.tokenizer.languages:
            return "unknown_language"
    return None
