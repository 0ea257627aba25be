"""NeMo's aggregate tokenizer on the fixture's two SentencePiece models (spl_tokens: 26 pieces,
en: 100). Expected ids are read off the spl_tokens piece list by hand; NeMo's own ids for the
canary2 prompt and the texts are checked in tests/nemo/test_import_nemo.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.errors import UserError
from speedasr.nemo.archive import read_nemo
from speedasr.nemo.import_nemo import tokenizer_state

NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"


@pytest.fixture(scope="module")
def state():
    return tokenizer_state(read_nemo(NEMO))


def test_offsets_and_special_tokens(state):
    tok = AggregateTokenizer.from_state(state)
    assert tok.vocab_size == 126 and tok.languages == ("en",)
    assert (tok.pad_id, tok.eot_id, tok.sot_id) == (2, 3, 4)
    spl = tok.models[0][1]
    assert spl.id_to_piece(25) == "▁"  # a text piece inside spl_tokens: not special
    assert tok.special_ids() == set(range(25))
    en = tok.models[1][1]
    assert tok.encode("Their", "en") == [i + 26 for i in en.encode("Their")]


def test_prompt_formats(state):
    canary2 = AggregateTokenizer.from_state(state)
    # <|startofcontext|> <|startoftranscript|> <|emo:undefined|> <|en|> <|en|> <|pnc|> <|noitn|>
    # <|notimestamp|> <|nodiarize|>
    assert canary2.prompt("en") == [7, 4, 8, 21, 21, 5, 14, 16, 18]
    assert canary2.prompt("en", pnc=False)[5] == 6
    canary = AggregateTokenizer.from_state({**state, "prompt_format": "canary"})
    # <|startoftranscript|> <|en|> <|transcribe|> <|en|> <|pnc|>
    assert canary.prompt("en") == [4, 21, 19, 21, 5]
    assert (canary2.prompt_length, canary.prompt_length) == (9, 5)  # what sizing counts
    with pytest.raises(UserError, match="language 'de'"):
        canary.prompt("de")  # <|de|> exists, but no 'de' SentencePiece model
    with pytest.raises(UserError, match="transcribe only"):
        canary.prompt("en", task="translate")


def test_decode_joins_pieces_and_skips_specials(state):
    tok = AggregateTokenizer.from_state(state)
    ids = tok.encode("Their painters were very poor.", "en")
    assert tok.decode([*tok.prompt("en"), *ids, tok.eot_id, *ids]) == (
        "Their painters were very poor."
    )
    the, i, r = tok.encode("Their", "en")  # pieces ▁The i r
    assert tok.decode([the, 25, i, r]) == "The ir"  # spl_tokens' ▁ is text: a space
    assert AggregateTokenizer.from_state(tok.to_state()).prompt("en") == tok.prompt("en")
