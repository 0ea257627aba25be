import pytest

from speedasr.metrics import normalize_text, word_error_rate


def test_normalize():
    assert normalize_text("Hello,  World!") == "hello world"
    assert (
        normalize_text("Hello, World!", lowercase=False, strip_punctuation=False) == "Hello, World!"
    )


def test_wer_hand_computed():
    # one substitution + one deletion over 6 reference words; an empty hypothesis deletes 2 words
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", ""]
    assert word_error_rate(refs, hyps) == pytest.approx(4 / 8)
    assert word_error_rate(["a b"], ["a b"]) == 0.0
    assert word_error_rate([""], ["x"]) == 1.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])
