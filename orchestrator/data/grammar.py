"""A seeded sentence grammar for the generated speech corpus.

Sentences are built from about twenty templates (statements, questions, negations,
reported speech, numbers, clock times, possessives and contractions) over a lexicon of
several hundred words. Every transcript uses only LibriSpeech's 28 characters: upper-case
letters, the apostrophe and the space.

The grammar is plain Python over ``random.Random``: the same seed gives the same sentences
on every platform and Python version (``random.Random`` with an int or str seed is stable).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# --- lexicon ------------------------------------------------------------------------------
# Spellings that are the same in British and American English, so every dialect voice reads
# the transcript as written.

NAMES = """
anna ben clara david emma frank grace henry isabel jack kate lucy martin nora oliver peter
rose samuel thomas victor walter alice arthur edith george helen james laura mary paul ruth
sarah simon daniel margaret robert ellen john agnes harold
""".split()

# singular -> plural for the irregular ones; the rest take "s" / "es" / "ies".
_IRREGULAR_PLURALS = {
    "child": "children", "woman": "women", "man": "men", "knife": "knives", "wolf": "wolves",
    "shelf": "shelves", "loaf": "loaves", "leaf": "leaves", "sheep": "sheep", "fish": "fish",
    "foot": "feet", "goose": "geese", "mouse": "mice", "thief": "thieves", "wife": "wives",
}

PERSONS = """
farmer teacher doctor soldier sailor child woman man captain king queen baker hunter driver
stranger friend brother sister mother father uncle servant merchant priest boy girl painter
miller fisherman carpenter shepherd student lawyer nurse guard thief wife traveller
""".split()

THINGS = """
basket letter box book horse dog cat bird apple lamp coat hat key bottle chair table window
door ship boat wagon candle knife cup plate bag rope ring clock coin map picture bell drum
blanket bucket bench ladder hammer pencil parcel sheep fish goose mouse wolf leaf loaf shelf
kettle mirror pillow saddle sword umbrella violin whistle garden field
""".split()

PLACES = """
river bridge road tower house church village forest hill island mountain valley castle
market kitchen station school hotel library farm shop mill cottage barn lake meadow palace
prison garden harbour office cellar attic square orchard stable theatre
""".split()

ADJECTIVES = """
old young small large red green blue white black brown heavy light bright dark quiet loud
happy angry tired hungry clever foolish strange gentle rich poor cold warm broken empty
golden silver wooden narrow wide tall short famous honest proud careful lonely ancient
beautiful dusty wet sharp simple curious patient busy sleepy brave kind wild silent yellow
""".split()


def _verb_forms(table: str) -> list[tuple[str, str, str]]:
    """``"carry carries carried, find finds found"`` -> (base, 3rd person singular, past)."""
    forms = [tuple(item.split()) for item in table.split(",")]
    bad = [f for f in forms if len(f) != 3]
    if bad:
        raise ValueError(f"verb table entries {bad} need three forms: base, third person, past")
    return forms  # type: ignore[return-value]


TRANSITIVE_VERBS = _verb_forms("""
carry carries carried, find finds found, take takes took, bring brings brought, see sees saw,
hold holds held, open opens opened, close closes closed, sell sells sold, buy buys bought,
paint paints painted, build builds built, watch watches watched, follow follows followed,
leave leaves left, lose loses lost, hide hides hid, drop drops dropped, lift lifts lifted,
push pushes pushed, pull pulls pulled, wash washes washed, clean cleans cleaned,
fix fixes fixed, mend mends mended, count counts counted, draw draws drew, keep keeps kept,
send sends sent, throw throws threw, catch catches caught, visit visits visited,
show shows showed, hear hears heard, want wants wanted, need needs needed, like likes liked,
remember remembers remembered, forget forgets forgot, borrow borrows borrowed,
steal steals stole, cover covers covered, fill fills filled, break breaks broke,
choose chooses chose, describe describes described, answer answers answered,
guard guards guarded, feed feeds fed, meet meets met
""")

INTRANSITIVE_VERBS = _verb_forms("""
walk walks walked, run runs ran, sleep sleeps slept, wait waits waited, sing sings sang,
laugh laughs laughed, cry cries cried, smile smiles smiled, dance dances danced,
arrive arrives arrived, return returns returned, rest rests rested, work works worked,
listen listens listened, shout shouts shouted, whisper whispers whispered,
wander wanders wandered, stay stays stayed, sit sits sat, stand stands stood, fall falls fell,
swim swims swam, hurry hurries hurried, pray prays prayed
""")

PREPOSITIONS = """
in near behind under beside across through along inside outside above below beyond toward
past around before
""".split()

TIMES = [
    "yesterday", "today", "tomorrow", "last night", "this morning", "in the evening",
    "at noon", "at midnight", "before dinner", "after breakfast", "in winter",
    "in the spring", "last summer", "every morning", "once again", "at dawn", "at sunset",
    "a week ago", "later that day", "the next morning", "every sunday", "on monday",
    "on tuesday", "on wednesday", "on thursday", "on friday", "on saturday",
    "in september", "in october", "in march", "in june",
]

ADVERBS = """
slowly quickly quietly carefully suddenly gladly often never always again softly sadly
eagerly gently firmly secretly proudly nearly almost rarely
""".split()

SUBJECT_PRONOUNS = ["i", "you", "he", "she", "we", "they"]
OBJECT_PRONOUNS = {"i": "me", "you": "you", "he": "him", "she": "her", "we": "us", "they": "them"}
BE_PAST = {"i": "was", "you": "were", "he": "was", "she": "was", "we": "were", "they": "were"}
BE_CONTRACTED = {"i": "i'm", "you": "you're", "he": "he's", "she": "she's", "we": "we're",
                 "they": "they're"}
NEGATIONS = ["didn't", "couldn't", "wouldn't", "shouldn't", "won't", "can't", "don't"]
CONNECTORS = ["because", "although", "while", "when", "before", "after", "until"]
OPINION_VERBS = ["said", "thought", "knew", "believed", "remembered", "told us", "wrote"]

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

# What a transcript may hold: LibriSpeech's 28 characters (letters, apostrophe, space).
TRANSCRIPT_RE = re.compile(r"^[A-Z']+( [A-Z']+)*$")


def number_words(n: int) -> str:
    """Spell ``n`` (0 <= n < 1000) the way it is spoken, e.g. 342 -> 'three hundred forty two'."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words takes 0 <= n < 1000, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def plural(noun: str) -> str:
    """English plural of a lexicon noun."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def vocabulary() -> frozenset[str]:
    """Every word the grammar can produce, upper case (as in transcripts)."""
    words: set[str] = set()
    for group in (NAMES, PERSONS, THINGS, PLACES, ADJECTIVES, PREPOSITIONS, ADVERBS,
                  SUBJECT_PRONOUNS, NEGATIONS, CONNECTORS, _ONES, _TENS[2:]):
        words.update(group)
    words.update(plural(n) for n in PERSONS + THINGS + PLACES)
    words.update(n + "'s" for n in NAMES)
    for forms in TRANSITIVE_VERBS + INTRANSITIVE_VERBS:
        words.update(forms)
    for group in (TIMES, OPINION_VERBS, list(OBJECT_PRONOUNS.values()),
                  list(BE_PAST.values()), list(BE_CONTRACTED.values())):
        for phrase in group:
            words.update(phrase.split())
    words.update(_TEMPLATE_WORDS.split())
    return frozenset(w.upper() for w in words)


# Function words that only the templates below use.
_TEMPLATE_WORDS = """
the a an and to of with going how without that there were was is it's let's many where when
why did will would have had if gave quite rather hundred o'clock at on i'll we'll they'll said
very some every but so then
"""


@dataclass(frozen=True)
class Sentence:
    """One generated sentence.

    Attributes:
        words: the transcript words, lower case.
        question: whether it is read as a question (the spoken text ends with '?').
    """

    words: tuple[str, ...]
    question: bool = False

    @property
    def transcript(self) -> str:
        """Upper-case transcript in LibriSpeech's alphabet."""
        return " ".join(self.words).upper()

    @property
    def spoken(self) -> str:
        """What eSpeak reads: lower case (it spells out all-caps words), final punctuation."""
        return " ".join(self.words) + ("?" if self.question else ".")


class Grammar:
    """Seeded sentence generator.

    Args:
        rng: the random generator (its state advances with every sentence).
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._templates = [
            self._transitive, self._transitive, self._count, self._possessive, self._negation,
            self._question, self._intransitive, self._there_were, self._reported,
            self._going_to, self._lets, self._clock, self._description, self._weather,
            self._conditional, self._because, self._plural_subject, self._future,
            self._gave, self._how_many, self._with,
        ]

    # --- pieces -------------------------------------------------------------------------
    def _pick(self, items):
        return self.rng.choice(items)

    def _maybe(self, p: float) -> bool:
        return self.rng.random() < p

    def _adjs(self, p: float = 0.5) -> list[str]:
        out = []
        if self._maybe(p):
            out.append(self._pick(ADJECTIVES))
            if self._maybe(p * 0.3):
                second = self._pick(ADJECTIVES)
                if second != out[0]:
                    out.append(second)
        return out

    def _np(self, nouns=None, p_adj: float = 0.5) -> list[str]:
        """A singular noun phrase: 'the old farmer', 'a basket', 'george's dog'."""
        noun = self._pick(nouns or (PERSONS + THINGS))
        r = self.rng.random()
        det = ["the"] if r < 0.6 else (["a"] if r < 0.8 else [self._pick(NAMES) + "'s"])
        adjs = self._adjs(p_adj)
        if det == ["a"] and (adjs[:1] or [noun])[0][0] in "aeiou":
            det = ["an"]
        return det + adjs + [noun]

    def _subject(self) -> tuple[list[str], str]:
        """A subject and its pronoun class (for agreement): a name, a noun phrase or a pronoun."""
        r = self.rng.random()
        if r < 0.35:
            return [self._pick(NAMES)], "he"
        if r < 0.75:
            return self._np(PERSONS), "he"
        pron = self._pick(SUBJECT_PRONOUNS)
        return [pron], pron

    def _number(self) -> list[str]:
        r = self.rng.random()
        n = self.rng.randint(2, 12) if r < 0.5 else (
            self.rng.randint(13, 99) if r < 0.85 else self.rng.randint(100, 999))
        return number_words(n).split()

    def _place(self) -> list[str]:
        return [self._pick(PREPOSITIONS)] + ["the"] + self._adjs(0.3) + [self._pick(PLACES)]

    def _time(self, p: float = 0.5) -> list[str]:
        return self._pick(TIMES).split() if self._maybe(p) else []

    def _adverb(self, p: float = 0.3) -> list[str]:
        return [self._pick(ADVERBS)] if self._maybe(p) else []

    # --- templates ----------------------------------------------------------------------
    def _transitive(self):
        subj, _ = self._subject()
        verb = self._pick(TRANSITIVE_VERBS)[2]
        return subj + self._adverb(0.2) + [verb] + self._np() + (
            self._place() if self._maybe(0.5) else []) + self._time(0.4)

    def _count(self):
        return ([self._pick(NAMES)] + [self._pick(TRANSITIVE_VERBS)[2]] + self._number()
                + self._adjs(0.4) + [plural(self._pick(THINGS))]
                + (self._place() if self._maybe(0.5) else []))

    def _possessive(self):
        degree = [self._pick(["very", "quite", "rather"])] if self._maybe(0.3) else []
        return ([self._pick(NAMES) + "'s", self._pick(THINGS), "was"] + degree
                + [self._pick(ADJECTIVES)] + self._time(0.6))

    def _negation(self):
        pron = self._pick(SUBJECT_PRONOUNS)
        return [pron, self._pick(NEGATIONS), self._pick(TRANSITIVE_VERBS)[0]] + self._np() + (
            self._time(0.6))

    def _question(self):
        wh = self._pick(["where", "when", "why", "how"])
        subj = [self._pick(NAMES)] if self._maybe(0.5) else self._np(PERSONS, 0.3)
        return [wh, "did"] + subj + [self._pick(TRANSITIVE_VERBS)[0]] + self._np(THINGS)

    def _intransitive(self):
        subj, _ = self._subject()
        return subj + [self._pick(INTRANSITIVE_VERBS)[2]] + self._adverb(0.4) + (
            self._place()) + self._time(0.4)

    def _there_were(self):
        return ["there", "were"] + self._number() + self._adjs(0.4) + [
            plural(self._pick(PERSONS + THINGS))] + self._place()

    def _reported(self):
        clause = self._pick([self._transitive, self._intransitive, self._possessive])()
        return [self._pick(NAMES)] + self._pick(OPINION_VERBS).split() + ["that"] + clause

    def _going_to(self):
        pron = self._pick(SUBJECT_PRONOUNS)
        return [BE_CONTRACTED[pron], "going", "to", self._pick(TRANSITIVE_VERBS)[0]] + (
            self._np()) + self._time(0.7)

    def _lets(self):
        return ["let's", self._pick(TRANSITIVE_VERBS)[0]] + self._np(THINGS) + self._place()

    def _clock(self):
        hour = number_words(self.rng.randint(1, 12)).split()
        return [self._pick(NAMES), "and", self._pick(NAMES), self._pick(INTRANSITIVE_VERBS)[2]
                ] + self._place() + ["at"] + hour + ["o'clock"]

    def _description(self):
        return ["the", self._pick(PLACES)] + self._place()[:1] + ["the", self._pick(PLACES)] + [
            "was", self._pick(ADJECTIVES), "and", self._pick(ADJECTIVES)]

    def _weather(self):
        return ["it's", self._pick(ADJECTIVES)] + self._place() + self._time(0.7)

    def _conditional(self):
        pron = self._pick(SUBJECT_PRONOUNS)
        third = pron in ("he", "she")
        verb = self._pick(TRANSITIVE_VERBS)
        other = self._pick(SUBJECT_PRONOUNS)
        return (["if", pron, verb[1] if third else verb[0]] + self._np(THINGS, 0.3)
                + [other, "will", self._pick(TRANSITIVE_VERBS)[0], OBJECT_PRONOUNS[pron]])

    def _because(self):
        pron = self._pick(SUBJECT_PRONOUNS)
        return ([self._pick(NAMES), self._pick(INTRANSITIVE_VERBS)[2]] + self._adverb(0.5)
                + [self._pick(CONNECTORS), pron, BE_PAST[pron], self._pick(ADJECTIVES)])

    def _plural_subject(self):
        return self._number() + self._adjs(0.3) + [plural(self._pick(PERSONS))] + [
            self._pick(INTRANSITIVE_VERBS)[2]] + self._adverb(0.3) + self._place()

    def _future(self):
        lead = self._pick(["i'll", "we'll", "they'll"])
        return [lead, self._pick(TRANSITIVE_VERBS)[0]] + self._number() + [
            plural(self._pick(THINGS))] + self._time(0.8)

    def _gave(self):
        return [self._pick(NAMES), self._pick(["gave", "sent", "showed", "brought"])] + (
            self._np(THINGS)) + ["to", self._pick(NAMES)] + self._time(0.5)

    def _how_many(self):
        return ["how", "many", plural(self._pick(THINGS)), "did", self._pick(NAMES),
                self._pick(TRANSITIVE_VERBS)[0]] + self._time(0.6)

    def _with(self):
        return ["the", self._pick(PERSONS), self._pick(["with", "without"])] + self._np(
            THINGS) + [self._pick(INTRANSITIVE_VERBS)[2]] + self._adverb(0.6) + self._time(0.4)

    # --- public -------------------------------------------------------------------------
    def sentence(self) -> Sentence:
        """One random sentence (any length the templates give: about 3 to 20 words)."""
        template = self._pick(self._templates)
        words = tuple(w for w in template() if w)
        question = template in (self._question, self._how_many)
        return Sentence(words=words, question=question)
