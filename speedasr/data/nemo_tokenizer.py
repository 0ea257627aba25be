"""NeMo Canary's aggregate tokenizer and its prompts (docs/canary.md §7), for imported models.

Several SentencePiece models share one id space: model ``k`` (in the config's order, the special
tokens' ``spl_tokens`` first) gets the offset ``Σ_{j<k} size_j``. Text in language ``xx`` is encoded
by ``xx``'s model and shifted by its offset; ids are decoded piece by piece, by range, as NeMo's
``AggregateTokenizer.ids_to_text`` does. Special tokens are looked up by piece, never hard-coded.

It has the interface of ``speedasr.data.tokenizer.Tokenizer`` that datasets, decoding and the
checkpoint use (``prompt``, ``encode``, ``decode``, ``eot_id``, ``pad_id``, ``special_ids``,
``vocab_size``, ``languages``, ``to_state``), so ``transcribe`` and ``eval`` run an imported model
as they run any other.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import sentencepiece as spm

from speedasr.errors import UserError

SPECIAL = "spl_tokens"
EOT, SOT, PAD = "<|endoftext|>", "<|startoftranscript|>", "<pad>"
PROMPT_FORMATS = ("canary", "canary2")
# A manifest's ``pnc`` as NeMo's prompt formatters read it (common/prompts/canary.py, PNC_TRUE and
# PNC_FALSE; canary2 takes the same values); NeMo refuses any other value, and so does speedasr.
PNC_YES = frozenset({"yes", "Yes", "true", "True", "1", "pnc", "<|pnc|>"})
PNC_NO = frozenset({"no", "No", "false", "False", "0", "nopnc", "<|nopnc|>"})


def prompt_pieces(prompt_format: str, language: str, pnc: bool = True) -> list[str]:
    """The pieces of a ``canary`` or ``canary2`` transcription prompt, ``language`` -> the same
    language (docs/canary.md §7.2; canary2 with an empty decoder context)."""
    lang, pnc_token = f"<|{language}|>", "<|pnc|>" if pnc else "<|nopnc|>"
    if prompt_format == "canary":
        return [SOT, lang, "<|transcribe|>", lang, pnc_token]
    return [
        "<|startofcontext|>", SOT, "<|emo:undefined|>", lang, lang, pnc_token,
        "<|noitn|>", "<|notimestamp|>", "<|nodiarize|>",
    ]  # fmt: skip


PROMPT_LENGTHS = {f: len(prompt_pieces(f, "en")) for f in PROMPT_FORMATS}
"""Prompt tokens of each NeMo prompt format: canary 5, canary2 9."""


def pnc_flag(value) -> bool:
    """NeMo's meaning of a manifest's ``pnc`` field: True for ``yes``/``true``/``1`` (and
    ``pnc``, ``<|pnc|>``), False for ``no``/``false``/``0`` (``nopnc``, ``<|nopnc|>``); a JSON
    ``true``/``false`` or ``1``/``0`` counts as its spelling. ``ValueError`` for anything else."""
    text = str(value)  # JSON true -> Python True -> "True"; 1 -> "1"
    if text in PNC_YES:
        return True
    if text in PNC_NO:
        return False
    raise ValueError(f"pnc {value!r} is not one of NeMo's values (yes/no, true/false, 1/0)")


@dataclass(frozen=True)
class AggregateTokenizer:
    """``models``: ``(name, SentencePieceProcessor)`` in id order; ``prompt_format``: ``canary``
    (5 tokens) or ``canary2`` (9 tokens with an empty decoder context)."""

    models: tuple[tuple[str, spm.SentencePieceProcessor], ...]
    prompt_format: str

    @classmethod
    def from_state(cls, state: dict) -> AggregateTokenizer:
        models = []
        for name, proto in state["langs"]:
            sp = spm.SentencePieceProcessor()
            sp.load_from_serialized_proto(proto)
            models.append((name, sp))
        if state.get("prompt_format") not in PROMPT_FORMATS:
            raise UserError(f"unknown NeMo prompt format {state.get('prompt_format')!r}")
        return cls(tuple(models), state["prompt_format"])

    def to_state(self) -> dict:
        return {
            "kind": "nemo_aggregate",
            "prompt_format": self.prompt_format,
            "langs": [[name, sp.serialized_model_proto()] for name, sp in self.models],
        }

    # --- ids ----------------------------------------------------------------------------------
    @functools.cached_property
    def _offsets(self) -> dict[str, int]:
        out, offset = {}, 0
        for name, sp in self.models:
            out[name] = offset
            offset += sp.get_piece_size()
        return out

    @functools.cached_property
    def _pieces(self) -> list[str]:
        """Piece of every aggregate id."""
        return [sp.id_to_piece(i) for _, sp in self.models for i in range(sp.get_piece_size())]

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.models if name != SPECIAL)

    def id(self, piece: str) -> int:
        """Id of a special token (a piece of the ``spl_tokens`` model)."""
        name, sp = self.models[0]
        i = sp.piece_to_id(piece)
        if sp.id_to_piece(i) != piece:
            raise KeyError(f"token {piece!r} is not in the special-token model {name!r}")
        return self._offsets[name] + i

    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def eot_id(self) -> int:
        return self.id(EOT)

    @property
    def sot_id(self) -> int:
        return self.id(SOT)

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        """NeMo's ``CanaryTokenizer.special_tokens``: the ``<|...|>`` pieces and ``<pad>`` of
        ``spl_tokens`` (plus its ``<unk>``/control pieces, never text); other pieces of it (e.g.
        ``▁``) are text."""
        sp = self.models[0][1]
        return frozenset(
            i
            for i in range(sp.get_piece_size())
            if sp.id_to_piece(i).startswith("<|")
            or sp.id_to_piece(i) == PAD
            or sp.is_control(i)
            or sp.is_unknown(i)
        )

    def special_ids(self) -> set[int]:
        return set(self._special_ids)

    # --- text ---------------------------------------------------------------------------------
    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Text ids in ``language``'s model (default: the first language), shifted by its offset."""
        lang = language or self.languages[0]
        self._check_language(lang)
        sp = dict(self.models)[lang]
        return [i + self._offsets[lang] for i in sp.encode(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to ``<|endoftext|>``, special tokens skipped; pieces joined and
        ``▁`` turned into spaces as NeMo's ``ids_to_text`` does (then stripped)."""
        eot, specials, pieces = self.eot_id, self._special_ids, []
        for i in ids:
            i = int(i)
            if i == eot:
                break
            if i not in specials and 0 <= i < self.vocab_size:
                pieces.append(self._pieces[i])
        return "".join(pieces).replace("▁", " ").strip()

    def _check_language(self, language: str) -> None:
        if language not in self.languages:
            raise UserError(
                f"language '{language}' is not in the tokenizer (has: {', '.join(self.languages)})"
            )

    def prompt(self, language: str = "en", task: str = "transcribe", pnc: bool = True) -> list[int]:
        """The checkpoint's prompt for ``language`` → ``language`` (transcription), with
        punctuation and capitals by default (Canary's default); docs/canary.md §7.2."""
        self._check_language(language)
        if task != "transcribe":
            raise UserError(f"task '{task}': imported NeMo models transcribe only in speedasr")
        try:
            return [self.id(t) for t in prompt_pieces(self.prompt_format, language, pnc)]
        except KeyError as e:
            raise UserError(
                f"the tokenizer cannot build a {self.prompt_format} prompt: {e}"
            ) from None

    @property
    def prompt_length(self) -> int:
        """Tokens of every prompt of this checkpoint's format (``PROMPT_LENGTHS``)."""
        return PROMPT_LENGTHS[self.prompt_format]
