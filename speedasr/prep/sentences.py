"""English sentences for the embedded corpus: word lists (assets/corpus_words.txt) and a small
grammar over them. Output is lowercase words; `SentenceGenerator` is driven by a `random.Random`
so sentences are a pure function of its seed."""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path


def _regular_second_form(word: str, section: str) -> str:
    """Plural of a noun or past tense of a verb by the regular English rules."""
    verb = section in ("transitive", "intransitive", "motion", "say")
    if word.endswith(("s", "x", "z", "ch", "sh")) and not verb:
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + ("ied" if verb else "ies")
    if verb:
        return word + ("d" if word.endswith("e") else "ed")
    return word + "s"


@lru_cache(maxsize=1)
def word_lists() -> dict[str, list[tuple[str, str]]]:
    """Sections of assets/corpus_words.txt as (base, second form) pairs, multi-word entries joined
    by spaces. The second form is the plural (nouns) or the past tense (verbs)."""
    path = Path(__file__).parent / "assets" / "corpus_words.txt"
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        for entry in line.split():
            base, _, form = entry.partition(":")
            form = form or _regular_second_form(base, current)
            pair = (base.replace("_", " "), form.replace("_", " "))
            if pair not in sections[current]:
                sections[current].append(pair)
    return sections


def vocabulary() -> list[str]:
    """Every word the sentence generator can produce, sorted."""
    words = set(_FUNCTION_WORDS.split())
    for pairs in word_lists().values():
        for base, form in pairs:
            words.update(base.split())
            words.update(form.split())
    return sorted(words)


_SUBJECT_PRONOUNS = ("i", "you", "he", "she", "we", "they")
_OBJECT_PRONOUNS = ("me", "you", "him", "her", "us", "them")
_DET_SINGULAR = ("the", "the", "the", "a", "a", "this", "that", "my", "your", "his", "her", "our")
_DET_PLURAL = ("the", "the", "some", "many", "these", "those", "our", "their", "all the")
_MODALS = ("will", "can", "should", "must", "might", "could", "would")
_CONJUNCTIONS = ("and", "but", "because", "so", "while", "when", "after", "before", "although")
_FUNCTION_WORDS = (
    " ".join(_SUBJECT_PRONOUNS + _OBJECT_PRONOUNS + _DET_SINGULAR + _DET_PLURAL + _MODALS)
    + " "
    + " ".join(_CONJUNCTIONS)
    + " an to that was were is are very so too did do not where why what please there on"
    + " in at with for of one"
)


class SentenceGenerator:
    """Random English sentences from a small grammar. Each sentence is a list of lowercase words."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.words = word_lists()
        self.templates = (
            self.transitive, self.transitive, self.intransitive, self.motion, self.there_is,
            self.copula, self.reported, self.question, self.modal, self.counting, self.compound,
            self.imperative,
        )  # fmt: skip

    def pick(self, section: str, second_form: bool = False) -> str:
        base, form = self.rng.choice(self.words[section])
        return form if second_form else base

    def maybe(self, p: float) -> bool:
        return self.rng.random() < p

    # -- phrases -----------------------------------------------------------------------------

    def noun_phrase(self, sections=("people", "animals", "things"), plural=None, det=None):
        """`det [adj [adj]] noun` as words; plural when `plural` (random when None); a random
        determiner when `det` is None, none when it is ""."""
        plural = self.maybe(0.25) if plural is None else plural
        words = [self.pick("adjectives") for _ in range(self.maybe(0.4) + self.maybe(0.1))]
        words.append(self.pick(self.rng.choice(sections), second_form=plural))
        if det is None:
            det = self.rng.choice(_DET_PLURAL if plural else _DET_SINGULAR)
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return det.split() + words

    def subject(self) -> tuple[list[str], bool]:
        """A subject and whether it takes plural agreement (were vs was)."""
        r = self.rng.random()
        if r < 0.25:
            pronoun = self.rng.choice(_SUBJECT_PRONOUNS)
            return [pronoun], pronoun in ("you", "we", "they")
        if r < 0.4:
            return [self.pick("names")], False
        plural = self.maybe(0.25)
        return self.noun_phrase(("people", "animals"), plural), plural

    def object(self) -> list[str]:
        r = self.rng.random()
        if r < 0.15:
            return [self.rng.choice(_OBJECT_PRONOUNS)]
        if r < 0.25:
            return [self.pick("names")]
        words = self.noun_phrase(("things", "things", "animals", "people"))
        if self.maybe(0.2):
            words += self.place_phrase()
        return words

    def place_phrase(self) -> list[str]:
        preposition = self.pick("prepositions")
        return preposition.split() + self.noun_phrase(("places", "things"), plural=False)

    def extras(self, p_place: float = 0.3, p_time: float = 0.3) -> list[str]:
        words = self.place_phrase() if self.maybe(p_place) else []
        return words + (self.pick("times").split() if self.maybe(p_time) else [])

    # -- sentence templates ------------------------------------------------------------------

    def transitive(self) -> list[str]:
        subject, _ = self.subject()
        return subject + [self.pick("transitive", True)] + self.object() + self.extras()

    def intransitive(self) -> list[str]:
        subject, _ = self.subject()
        adverb = [self.pick("adverbs")] if self.maybe(0.4) else []
        return subject + [self.pick("intransitive", True)] + adverb + self.extras(0.4)

    def motion(self) -> list[str]:
        subject, _ = self.subject()
        place = ["to"] + self.noun_phrase(("places",), plural=False)
        return subject + self.pick("motion", True).split() + place + self.extras(0.0, 0.5)

    def there_is(self) -> list[str]:
        sections = ("things", "animals", "people")
        if self.maybe(0.5):
            return ["there", "was"] + self.noun_phrase(sections, False, "a") + self.place_phrase()
        count = self.pick("numbers")
        noun = self.noun_phrase(sections, plural=True, det="")
        return ["there", "were", count] + noun + self.place_phrase()

    def copula(self) -> list[str]:
        subject, plural = self.subject()
        verb = "were" if plural else "was"
        degree = [self.rng.choice(("very", "so", "too", "really"))] if self.maybe(0.4) else []
        return subject + [verb] + degree + [self.pick("adjectives")] + self.extras(0.2, 0.3)

    def reported(self) -> list[str]:
        subject, _ = self.subject()
        clause = self.rng.choice((self.transitive, self.intransitive, self.copula, self.motion))
        return subject + self.pick("say", True).split() + ["that"] + clause()

    def question(self) -> list[str]:
        r = self.rng.random()
        subject, _ = self.subject()
        if r < 0.5:
            return ["did"] + subject + [self.pick("transitive")] + self.object() + self.extras(0.2)
        if r < 0.75:
            return ["where", "did"] + subject + [self.pick("motion")] + self.extras(0.0, 0.4)
        return ["why", "was", "the", self.pick("things"), "so", self.pick("adjectives")]

    def modal(self) -> list[str]:
        subject, _ = self.subject()
        negation = ["not"] if self.maybe(0.2) else []
        verb = [self.pick("transitive")] + self.object()
        return subject + [self.rng.choice(_MODALS)] + negation + verb + self.extras(0.2)

    def counting(self) -> list[str]:
        subject, _ = self.subject()
        verb = self.rng.choice(("bought", "found", "saw", "needed", "sold", "counted", "brought"))
        words = subject + [verb, self.pick("numbers")]
        words += self.noun_phrase(("things", "animals"), plural=True, det="")
        if self.maybe(0.4):
            words += ["and", self.pick("numbers")]
            words += self.noun_phrase(("things", "animals"), plural=True, det="")
        return words + self.extras(0.2, 0.3)

    def compound(self) -> list[str]:
        simple = (self.transitive, self.intransitive, self.copula, self.motion)
        first, second = self.rng.choice(simple)(), self.rng.choice(simple)()
        # The comma is only for eSpeak's prosody; transcripts drop punctuation.
        return first[:-1] + [first[-1] + ","] + [self.rng.choice(_CONJUNCTIONS)] + second

    def imperative(self) -> list[str]:
        please = ["please"] if self.maybe(0.5) else []
        verb = self.pick("transitive")
        return please + [verb] + self.noun_phrase(("things",)) + self.extras(0.4, 0.0)

    def short(self) -> list[str]:
        return self.pick("short").split()

    def sentence(self) -> list[str]:
        return self.rng.choice(self.templates)()
