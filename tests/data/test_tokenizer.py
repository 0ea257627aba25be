import pytest

from speedasr.core.geometry import PROMPT_TOKENS
from speedasr.data.tokenizer import EOT, SOT, Tokenizer
from speedasr.errors import UserError

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model can learn a small vocabulary",
    "speech recognition without padding",
] * 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(
        TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=80, languages=["en", "de"]
    )


def test_round_trip(tok):
    for text in TEXTS[:3]:
        assert tok.decode(tok.encode(text)) == text


def test_prompt_tokens(tok):
    prompt = tok.prompt("de", task="transcribe", pnc=True)
    pieces = [tok.sp.id_to_piece(i) for i in prompt]
    assert pieces == [SOT, "<|de|>", "<|transcribe|>", "<|pnc|>"]
    # core.geometry.PROMPT_TOKENS (what sizing and bins count) is the length of the real prompt
    assert tok.prompt_length == len(prompt) == PROMPT_TOKENS == 4
    assert tok.sp.id_to_piece(tok.eot_id) == EOT
    # decode skips the prompt and stops at end-of-text
    ids = prompt + tok.encode("speech recognition") + [tok.eot_id] + tok.encode("the dog")
    assert tok.decode(ids) == "speech recognition"


def test_specials_are_single_tokens_not_split(tok):
    assert tok.pad_id == 0
    assert len(set(tok.prompt())) == 4
    assert all(i in tok.special_ids() for i in tok.prompt())
    assert not set(tok.encode("the quick brown fox")) & tok.special_ids()


def test_save_load_and_state(tok):
    again = Tokenizer.load(tok.directory)
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert again.languages == ("de", "en")
    embedded = Tokenizer.from_state(tok.to_state())
    assert embedded.prompt("en") == tok.prompt("en")


def test_errors(tok, tmp_path):
    with pytest.raises(UserError, match="not in the tokenizer"):
        tok.prompt("fr")
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(UserError, match="no non-empty"):
        Tokenizer.train(["", "  "], tmp_path / "t")
