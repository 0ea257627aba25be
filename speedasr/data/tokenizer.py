"""Sentencepiece tokenizer with Canary-style prompt tokens.

The decoder of a Canary-style model reads a prompt before the transcript:
``<|startoftranscript|> <|lang|> <|task|> <|pnc|>|<|nopnc|>`` then text tokens, and ends with
``<|endoftext|>``. The special tokens live in the same sentencepiece vocabulary (as user-defined
symbols), so one id space serves the embedding, the output layer and CTC (blank = pad).

A tokenizer directory holds ``tokenizer.model`` (sentencepiece) and ``tokenizer.json`` (languages
and settings).
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import sentencepiece as spm

from speedasr.core.geometry import PROMPT_TOKENS
from speedasr.errors import UserError

PAD = "<pad>"
UNK = "<unk>"
EOT = "<|endoftext|>"
SOT = "<|startoftranscript|>"
TASKS = ("transcribe", "translate")
PNC = "<|pnc|>"
NOPNC = "<|nopnc|>"


def language_token(lang: str) -> str:
    return f"<|{lang}|>"


def task_token(task: str) -> str:
    return f"<|{task}|>"


def prompt_pieces(language: str, task: str, pnc: bool) -> list[str]:
    """speedasr's prompt: ``<|startoftranscript|> <|lang|> <|task|> <|pnc|>|<|nopnc|>``."""
    return [SOT, language_token(language), task_token(task), PNC if pnc else NOPNC]


@dataclass(frozen=True)
class Tokenizer:
    """Encode/decode text and build prompts. Load with ``Tokenizer.load(dir)``."""

    sp: spm.SentencePieceProcessor
    languages: tuple[str, ...]
    directory: Path | None = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        out_dir: str | Path,
        vocab_size: int = 256,
        model_type: Literal["bpe", "unigram"] = "bpe",
        languages: Iterable[str] = ("en",),
    ) -> Tokenizer:
        """Train sentencepiece on ``texts`` and save to ``out_dir``.

        ``vocab_size`` counts the special tokens too. Raises ``UserError`` when there is no text or
        the vocabulary cannot be that large for this text.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        languages = tuple(sorted(set(languages)))
        specials = [EOT, SOT, *map(task_token, TASKS), PNC, NOPNC, *map(language_token, languages)]
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            n = 0
            for text in texts:
                text = text.strip()
                if text:
                    f.write(text + "\n")
                    n += 1
            corpus = f.name
        if n == 0:
            raise UserError("tokenizer training got no non-empty transcripts")
        try:
            spm.SentencePieceTrainer.train(
                input=corpus,
                model_prefix=str(out_dir / "tokenizer"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                pad_id=0,
                unk_id=1,
                bos_id=-1,
                eos_id=-1,
                pad_piece=PAD,
                unk_piece=UNK,
                user_defined_symbols=specials,
                minloglevel=2,
                # Transcripts can be long (30 s of speech); don't let sentencepiece drop them.
                max_sentence_length=1 << 16,
            )
        except RuntimeError as e:
            detail = str(e).splitlines()[0]
            if "vocab_size" in detail or "Vocabulary size" in detail:
                raise UserError(
                    f"vocab_size {vocab_size} does not fit these transcripts (too small for their "
                    f"characters + special tokens, or more pieces than the text has): {detail}"
                ) from None
            raise UserError(f"sentencepiece training failed: {detail}") from None
        finally:
            Path(corpus).unlink(missing_ok=True)
        meta = {"languages": list(languages), "model_type": model_type, "vocab_size": vocab_size}
        (out_dir / "tokenizer.json").write_text(json.dumps(meta, indent=2) + "\n")
        return cls.load(out_dir)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer directory (or its ``tokenizer.model`` file)."""
        path = Path(path)
        directory = path.parent if path.suffix == ".model" else path
        model, meta = directory / "tokenizer.model", directory / "tokenizer.json"
        if not model.is_file() or not meta.is_file():
            raise UserError(
                f"tokenizer '{path}' not found: expected {model} and {meta} "
                "(create it with `speedasr tokenizer train`)"
            )
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(model))
            languages = tuple(json.loads(meta.read_text())["languages"])
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"tokenizer '{directory}' is corrupt: {e}") from None
        return cls(sp=sp, languages=languages, directory=directory)

    def to_state(self) -> dict:
        """Self-contained, pickle-free state (bytes + strings) to embed in checkpoints."""
        return {"model": self.sp.serialized_model_proto(), "languages": list(self.languages)}

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        sp = spm.SentencePieceProcessor()
        sp.load_from_serialized_proto(state["model"])
        return cls(sp=sp, languages=tuple(state["languages"]))

    # --- ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != UNK:
            raise KeyError(f"token {piece!r} is not in the vocabulary")
        return i

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def eot_id(self) -> int:
        return self.id(EOT)

    @property
    def sot_id(self) -> int:
        return self.id(SOT)

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        # decode() runs once per hypothesis: scan the vocabulary once, not on every call.
        return frozenset(
            i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.id_to_piece(i).startswith("<|") or i == self.pad_id
        )

    def special_ids(self) -> set[int]:
        """Ids of pad, control and ``<|...|>`` tokens (never part of a transcript)."""
        return set(self._special_ids)

    # --- text ---------------------------------------------------------------------------------
    def encode(self, text: str, language: str | None = None) -> list[int]:
        """Text tokens only (no prompt, no end-of-text). ``language`` is not needed: one model
        serves every language (NeMo's aggregate tokenizer takes it)."""
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping special tokens and stopping at ``<|endoftext|>``."""
        eot, specials, out = self.eot_id, self._special_ids, []
        for i in ids:
            i = int(i)
            if i == eot:
                break
            if i not in specials:
                out.append(i)
        return self.sp.decode(out)

    def prompt(
        self, language: str = "en", task: str = "transcribe", pnc: bool = False
    ) -> list[int]:
        """Canary-style prompt: ``<|startoftranscript|> <|lang|> <|task|> <|pnc|>|<|nopnc|>``."""
        if language not in self.languages:
            raise UserError(
                f"language '{language}' is not in the tokenizer (has: {', '.join(self.languages)})"
            )
        if task not in TASKS:
            raise UserError(f"task '{task}' is not one of {TASKS}")
        return [self.id(piece) for piece in prompt_pieces(language, task, pnc)]

    @property
    def prompt_length(self) -> int:
        """Tokens of every prompt (``PROMPT_TOKENS``)."""
        return PROMPT_TOKENS
