"""Word error rate: a standard text normaliser, then jiwer's alignment and measures.

Normalisers (``speedasr eval --normalizer``; the default also scores validation in training):

* ``whisper_en`` (default): Whisper's English normaliser (package ``whisper-normalizer``: the
  code of openai/whisper without the model), as the Open ASR Leaderboard and most published
  English WERs use: lowercase; bracketed and parenthesised spans and fillers (hmm, uh, um)
  removed; contractions expanded ("don't" -> "do not"); spelled-out numbers to digits ("twenty
  five" -> "25"); British to American spelling; punctuation and symbols to spaces; diacritics
  removed. One addition: typographic apostrophes (’ ‘ ʼ) become ``'`` first, so "don’t" reads
  as "don't" (Whisper alone would make it "don t").
* ``basic``: Whisper's language-independent normaliser, for languages other than English:
  lowercase, bracketed spans removed, punctuation and symbols to spaces (so "don't" is two
  words, "don t"), letters of every script kept.
* ``none``: the texts as they are (case and punctuation count); only whitespace is collapsed.

WER = (substitutions + deletions + insertions) / reference words, summed over the corpus.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import jiwer

Normalizer = Literal["whisper_en", "basic", "none"]
NORMALIZERS: tuple[str, ...] = ("whisper_en", "basic", "none")
DEFAULT_NORMALIZER: Normalizer = "whisper_en"

# Apostrophes that Whisper's English normaliser does not know: it would split "don’t" into "don t"
# where "don't" becomes "do not", so a reference and a hypothesis differing only in the apostrophe
# character would count two errors.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


@functools.cache
def normalizer(name: str) -> Callable[[str], str]:
    """The text normaliser called ``name`` (one of `NORMALIZERS`); raises ValueError otherwise."""
    if name == "none":
        return lambda text: text
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r} (choose from {', '.join(NORMALIZERS)})")
    try:  # imported here: only WER needs it, and `import speedasr.metrics` stays cheap
        if name == "whisper_en":
            from whisper_normalizer.english import EnglishTextNormalizer
        else:
            from whisper_normalizer.basic import BasicTextNormalizer
    except ImportError as e:
        raise ImportError(
            f"the {name} normalizer needs the package whisper-normalizer ({e}): "
            "pip install whisper-normalizer, or use normalizer 'none'"
        ) from e
    if name == "basic":
        return BasicTextNormalizer()
    english = EnglishTextNormalizer()
    return lambda text: english(text.translate(_APOSTROPHES))


def normalize_text(text: str, normalizer_name: str = DEFAULT_NORMALIZER) -> str:
    """``text`` as the WER sees it: normalised, words separated by single spaces."""
    return " ".join(normalizer(normalizer_name)(text).split())


@dataclass(frozen=True)
class WordErrors:
    """Alignment counts of reference against hypothesis words (one utterance or a corpus)."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def reference_words(self) -> int:
        return self.hits + self.substitutions + self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """errors / reference words; without reference words 0 if nothing was inserted, else 1."""
        if self.reference_words == 0:
            return 0.0 if self.insertions == 0 else 1.0
        return self.errors / self.reference_words

    def __add__(self, other: WordErrors) -> WordErrors:
        return WordErrors(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    def to_dict(self) -> dict[str, float | int]:
        """``wer`` and the counts, as eval's JSON writes them."""
        return {"wer": self.wer, **asdict(self), "reference_words": self.reference_words}


def word_errors(ref: str, hyp: str, normalizer_name: str = DEFAULT_NORMALIZER) -> WordErrors:
    """jiwer's alignment counts of one normalised reference/hypothesis pair."""
    ref, hyp = normalize_text(ref, normalizer_name), normalize_text(hyp, normalizer_name)
    if not ref or not hyp:  # jiwer 3 refuses empty strings; the counts need no alignment
        return WordErrors(deletions=len(ref.split()), insertions=len(hyp.split()))
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.hits, out.substitutions, out.deletions, out.insertions)


def corpus_word_errors(
    refs: Sequence[str], hyps: Sequence[str], normalizer_name: str = DEFAULT_NORMALIZER
) -> list[WordErrors]:
    """Per-utterance `WordErrors` of aligned lists; ``sum(result, WordErrors())`` is the corpus."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    return [word_errors(r, h, normalizer_name) for r, h in zip(refs, hyps, strict=True)]


def word_error_rate(
    refs: Sequence[str], hyps: Sequence[str], normalizer_name: str = DEFAULT_NORMALIZER
) -> float:
    """Corpus WER: total edits / total reference words, after `normalize_text`.

    Empty references are allowed (their hypothesis words count as insertions); a corpus with no
    reference words at all has WER 0 if every hypothesis is empty too, else 1.
    """
    return sum(corpus_word_errors(refs, hyps, normalizer_name), WordErrors()).wer
