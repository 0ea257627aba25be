"""Word error rate with light text normalization (jiwer does the alignment)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import jiwer

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str, lowercase: bool = True, strip_punctuation: bool = True) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace."""
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def word_error_rate(
    refs: Sequence[str], hyps: Sequence[str], lowercase: bool = True, strip_punctuation: bool = True
) -> float:
    """Corpus WER (total edits / total reference words), after ``normalize_text``.

    Empty references are allowed (their hypothesis words count as insertions); a corpus with no
    reference words at all has WER 0 if every hypothesis is empty too, else 1.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    r = [normalize_text(t, lowercase, strip_punctuation) for t in refs]
    h = [normalize_text(t, lowercase, strip_punctuation) for t in hyps]
    num_ref_words = sum(len(t.split()) for t in r)
    if num_ref_words == 0:
        return 0.0 if all(not t for t in h) else 1.0
    edits = 0
    for ref, hyp in zip(r, h, strict=False):
        if not ref:
            edits += len(hyp.split())
        elif not hyp:
            edits += len(ref.split())
        else:
            out = jiwer.process_words(ref, hyp)
            edits += out.substitutions + out.deletions + out.insertions
    return edits / num_ref_words
