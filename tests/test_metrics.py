"""WER: expected values counted by hand from each normaliser's documented rules."""

import pytest

from speedasr.metrics import (
    DEFAULT_NORMALIZER,
    NORMALIZERS,
    WordErrors,
    corpus_word_errors,
    normalize_text,
    word_error_rate,
    word_errors,
)


def test_default_scores_apostrophes_and_unicode_quotes_as_no_error():
    # Default arguments only, so this also runs against the hand-rolled normaliser it replaced,
    # which scored both pairs 2 errors in 4 words: "don't" -> "don t" vs "do not" (2 substitutions),
    # and the curly quotes stayed words ("“hello", "”").
    assert word_error_rate(["I don't know"], ["I do not know"]) == 0.0
    assert word_error_rate(["I don’t know."], ["i don't know"]) == 0.0
    assert word_error_rate(["“Hello,” she said."], ["hello she said"]) == 0.0


@pytest.mark.parametrize(
    "ref, hyp, normalizer, expected",
    [
        # whisper_en: "don't" -> "do not" (4 words); "dont" is not a contraction: S do->dont, D not.
        ("i don't know", "i dont know", "whisper_en", 2 / 4),
        # basic: apostrophe -> space, "don t" (4 words): S don->dont, D t.
        ("i don't know", "i dont know", "basic", 2 / 4),
        # none: jiwer alone, 3 words, one substitution.
        ("i don't know", "i dont know", "none", 1 / 3),
        # none keeps case and punctuation: "Hello," != "hello", "World!" != "world".
        ("Hello, World!", "hello world", "none", 2 / 2),
        ("Hello, World!", "hello world", "basic", 0.0),
        # whisper_en: spelled-out numbers and currency -> "25 apples cost $20" on both sides.
        ("Twenty five apples cost twenty dollars.", "25 apples cost $20", "whisper_en", 0.0),
        # basic leaves numbers alone: ref "twenty five apples cost twenty dollars" (6 words),
        # hyp "25 apples cost 20" ($ is a symbol): S twenty->25, D five, S twenty->20, D dollars.
        ("Twenty five apples cost twenty dollars.", "25 apples cost $20", "basic", 4 / 6),
        # whisper_en: British -> American spelling, bracketed/parenthesised spans and fillers go.
        (
            "It's the colour (laughs) [noise] of honey",
            "it is the color of um honey",
            "whisper_en",
            0,
        ),
        # whisper_en: diacritics removed; basic keeps them: ça/ca and café/cafe are substitutions.
        ("Ça va au café", "ca va au cafe", "whisper_en", 0.0),
        ("Ça va au café", "ca va au cafe", "basic", 2 / 4),
    ],
)
def test_wer_per_normalizer(ref, hyp, normalizer, expected):
    assert word_error_rate([ref], [hyp], normalizer) == pytest.approx(expected)


def test_normalize_text():
    assert normalize_text("“Hello,”  she said.") == "hello she said"
    assert normalize_text("Mr. Smith can’t come", "whisper_en") == "mister smith can not come"
    assert normalize_text("Mr. Smith can’t come", "basic") == "mr smith can t come"
    assert normalize_text("  Keep, Everything!  ", "none") == "Keep, Everything!"
    assert DEFAULT_NORMALIZER == "whisper_en" and set(NORMALIZERS) == {
        "whisper_en",
        "basic",
        "none",
    }
    with pytest.raises(ValueError, match="unknown normalizer 'english'"):
        normalize_text("x", "english")


@pytest.mark.parametrize(
    "ref, hyp, hits, substitutions, deletions, insertions",
    [
        ("the cat sat on the mat", "the cat sit on mat", 4, 1, 1, 0),  # sat->sit, - the
        ("a b c", "x a b c d", 3, 0, 0, 2),  # + x, + d
        ("one two three four", "one too three", 2, 1, 1, 0),  # two->too, - four
        ("hello world", "", 0, 0, 2, 0),
        ("", "surprise words", 0, 0, 0, 2),
        ("", "", 0, 0, 0, 0),
    ],
)
def test_hand_counted_alignment(ref, hyp, hits, substitutions, deletions, insertions):
    counts = word_errors(ref, hyp, "none")
    assert counts == WordErrors(hits, substitutions, deletions, insertions)
    assert counts.reference_words == len(ref.split())
    assert counts.errors == substitutions + deletions + insertions


def test_corpus_counts_are_sums_and_wer_is_total_edits_over_total_words():
    refs = ["the cat sat on the mat", "hello world", "a b c"]
    hyps = ["the cat sit on mat", "", "x a b c d"]
    per_utterance = corpus_word_errors(refs, hyps, "none")
    total = sum(per_utterance, WordErrors())
    assert total == WordErrors(hits=7, substitutions=1, deletions=3, insertions=2)
    assert total.reference_words == 11
    assert total.wer == pytest.approx(6 / 11) == word_error_rate(refs, hyps, "none")
    assert total.to_dict() == {
        "wer": pytest.approx(6 / 11), "hits": 7, "substitutions": 1, "deletions": 3,
        "insertions": 2, "reference_words": 11,
    }  # fmt: skip
    assert [c.wer for c in per_utterance] == pytest.approx([2 / 6, 1.0, 2 / 3])


def test_empty_references():
    assert word_error_rate([""], ["x"]) == 1.0  # only insertions, no reference word
    assert word_error_rate([""], [""]) == 0.0
    assert word_error_rate(["Hmm."], ["uh"]) == 0.0  # fillers: nothing left on either side
    with pytest.raises(ValueError, match="1 references but 0 hypotheses"):
        word_error_rate(["a"], [])
