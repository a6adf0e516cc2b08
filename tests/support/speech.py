"""Comparing what a recogniser heard with what was said: both sides normalised as Whisper's own
evaluations do (case, punctuation, spellings, "twelve" and "12" alike), so a backend that
writes numbers as digits is not counted wrong for it."""

from __future__ import annotations

from collections import Counter
from functools import cache

from whisper_normalizer.english import EnglishTextNormalizer


@cache
def _normaliser() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def normalised_words(text: str) -> list[str]:
    normalised: str = _normaliser()(text)
    return normalised.split()


def words_found(reference: str, hypothesis: str) -> tuple[int, int]:
    """(reference words the hypothesis has too, each hypothesis word used once; reference
    words), after normalising both."""
    ref, hyp = normalised_words(reference), normalised_words(hypothesis)
    return sum((Counter(ref) & Counter(hyp)).values()), len(ref)
