"""Answer normalisation in the VQA evaluation's convention, so that "Two." and "2", or "a circle" and
"circle", count as the same answer.

Steps, in the order of the VQA evaluation script: lower case and surrounding space; punctuation (a period
before a digit is kept ("2.5"), a comma inside a number dropped ("1,000" becomes "1000"); other punctuation
next to a space is dropped, inside a word it becomes a space); number words to digits ("two" → "2"); articles dropped
("a", "an", "the"); common contractions written with their apostrophe ("dont" → "don't").

This module imports only the standard library: `vdep eval --write-lmms-task` copies its source into the
lmms-eval task's utils.py, so that lmms-eval scores with the very same rule.
"""

from __future__ import annotations

import re

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't", "shouldnt": "shouldn't",
    "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "thats": "that's", "whats": "what's", "wheres": "where's", "theres": "there's", "im": "i'm",
}
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!*#%^&$~|:"
# A period is kept only where a digit follows it (as the VQA script does in effect): "2.5" stays, "2." is 2.
_PERIOD_OUTSIDE_NUMBER = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d),(\d)")


def _strip_punctuation(text: str) -> str:
    # An apostrophe goes without a trace, so that "don't" and "dont" meet (as "don't", below).
    text = _COMMA_IN_NUMBER.sub(r"\1\2", text).replace("'", "")
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD_OUTSIDE_NUMBER.sub("", text)


def normalise_answer(text: str) -> str:
    """The comparable form of an answer (see the module docstring)."""
    words = _strip_punctuation(text.strip().lower()).split()
    kept = [CONTRACTIONS.get(NUMBER_WORDS.get(word, word), NUMBER_WORDS.get(word, word))
            for word in words if word not in ARTICLES]
    return " ".join(kept)


def answers_match(answer: str, reference: str) -> bool:
    return normalise_answer(answer) == normalise_answer(reference)
