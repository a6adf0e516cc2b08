"""The embedded recogniser: PocketSphinx with the US English model that ships in its package.

Offline, nothing to download, about 0.2 x real time on one core. Accuracy on radio speech is
modest (see bench/transcribe.py); it is the default because it always works, and the openai
backend is there for quality.

Custom vocabulary (TRANSCRIBE_VOCABULARY): each phrase becomes one word of its own in the
dictionary and the language model ("medic three" -> `medic_three`, pronounced as its words), so
the decoder can take the whole phrase as one likely unit instead of assembling it from common
words; the underscores become spaces again in the text. Words the bundled dictionary lacks
(street names, local units) need a pronunciation in TRANSCRIBE_POCKETSPHINX_DICT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from workers.audio.codec import RECOGNIZER_RATE, decode_prepared, pieces_at_pauses
from workers.core.settings import TranscriptionSettings
from workers.recognizers import (
    Recognition,
    RecognizerConfigError,
    Segment,
    Word,
    vocabulary_terms,
)

log = logging.getLogger(__name__)

FRAMES_PER_SEC = 100  # the model's frame rate (-frate)
# Long calls are decoded in pieces of at most this long, cut at the quietest moment near the
# end of each piece: memory stays flat, and Celery's soft time limit gets a chance between
# pieces (it cannot interrupt the decoder's C code).
MAX_UTTERANCE_SEC = 30.0
# A pause this long between words starts a new segment.
SEGMENT_GAP_SEC = 0.5
COMPOUND_JOINER = "_"


@dataclass(frozen=True)
class _Word:
    text: str
    start: float
    end: float
    prob: float


class PocketsphinxRecognizer:
    backend = "pocketsphinx"

    def __init__(self, vocabulary: list[str] | None = None, extra_dict: Path | None = None) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise RecognizerConfigError(
                f"TRANSCRIBE_BACKEND=pocketsphinx: the pocketsphinx package is missing ({exc})"
            ) from exc
        try:
            self.decoder = Decoder(loglevel="FATAL")
        except (RuntimeError, ValueError) as exc:
            raise RecognizerConfigError(
                f"TRANSCRIBE_BACKEND=pocketsphinx: its bundled model does not load: {exc}"
            ) from exc
        self.model = f"pocketsphinx-{metadata.version('pocketsphinx')} en-us"
        additions = self._new_entries(_read_dictionary(extra_dict)) if extra_dict else []
        additions += self._vocabulary_compounds(vocabulary or [], dict(additions))
        for i, (word, phones) in enumerate(additions):
            try:
                # Rebuilding the search once, after the last word, not after each.
                self.decoder.add_word(word, phones, i == len(additions) - 1)
            except RuntimeError as exc:
                raise RecognizerConfigError(
                    f"TRANSCRIBE_POCKETSPHINX_DICT / TRANSCRIBE_VOCABULARY: pocketsphinx refused "
                    f"the word {word!r} ({phones}; are these the model's phones?): {exc}"
                ) from exc
        self.vocabulary = vocabulary or []

    @classmethod
    def from_settings(cls, transcription: TranscriptionSettings) -> PocketsphinxRecognizer:
        extra = transcription.pocketsphinx_dict
        return cls(vocabulary_terms(transcription.vocabulary), Path(extra) if extra else None)

    def _new_entries(self, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Words the dictionary has already get the new pronunciation as an alternate."""
        out: list[tuple[str, str]] = []
        taken = set()

        def known(name: str) -> bool:
            return name in taken or self.decoder.lookup_word(name) is not None

        for word, phones in entries:
            name, n = word, 2
            while known(name):
                name, n = f"{word}({n})", n + 1
            taken.add(name)
            out.append((name, phones))
        return out

    def _vocabulary_compounds(
        self, vocabulary: list[str], extra: dict[str, str]
    ) -> list[tuple[str, str]]:
        compounds: list[tuple[str, str]] = []
        for term in vocabulary:
            words = term.lower().split()
            phones = []
            for word in words:
                pron = self.decoder.lookup_word(word) or extra.get(word)
                if not pron:
                    raise RecognizerConfigError(
                        f"TRANSCRIBE_VOCABULARY: pocketsphinx has no pronunciation for {word!r} "
                        f"(in {term!r}); spell numbers out, or give it one in "
                        "TRANSCRIBE_POCKETSPHINX_DICT"
                    )
                phones.append(pron)
            if len(words) > 1:
                compounds.append((COMPOUND_JOINER.join(words), " ".join(phones)))
        return compounds

    def transcribe(self, audio_path: Path, *, name: str) -> Recognition:
        return self.recognize_samples(decode_prepared(audio_path))

    def recognize_samples(self, samples: np.ndarray) -> Recognition:
        duration = len(samples) / RECOGNIZER_RATE
        words: list[_Word] = []
        for start, end in pieces_at_pauses(samples, MAX_UTTERANCE_SEC):
            words += self._decode(samples[start:end], offset=start / RECOGNIZER_RATE)
        segments = _segments(words)
        text = " ".join(s.text for s in segments)
        confidence = float(np.mean([w.prob for w in words])) if words else None
        return Recognition(
            text=text,
            model=self.model,
            language="en",
            confidence=confidence,
            segments=segments,
            audio_duration_sec=duration,
        )

    def _decode(self, samples: np.ndarray, offset: float) -> list[_Word]:
        if len(samples) < RECOGNIZER_RATE // 100:
            return []  # less than one frame
        d = self.decoder
        d.start_utt()
        try:
            # The whole piece at once (full_utt): cepstral mean normalisation over the
            # utterance, a little more accurate than live, chunked decoding.
            d.process_raw(np.ascontiguousarray(samples, dtype=np.int16).tobytes(), False, True)
        finally:
            d.end_utt()  # never leave the decoder inside an utterance
        if d.hyp() is None:
            return []
        out = []
        for seg in d.seg():
            word = _clean(seg.word)
            if word is None:
                continue
            out.append(
                _Word(
                    word.replace(COMPOUND_JOINER, " "),
                    offset + seg.start_frame / FRAMES_PER_SEC,
                    offset + (seg.end_frame + 1) / FRAMES_PER_SEC,
                    min(1.0, max(0.0, float(seg.prob))),
                )
            )
        return out


def _clean(word: str) -> str | None:
    """The word without its alternate-pronunciation mark; None for silence, noise, fillers."""
    if not word or word[0] in "<[+":
        return None
    if word.endswith(")") and "(" in word:
        word = word[: word.index("(")]
    return word or None


def _segments(words: list[_Word]) -> list[Segment]:
    groups: list[list[_Word]] = []
    for w in words:
        if groups and w.start - groups[-1][-1].end < SEGMENT_GAP_SEC:
            groups[-1].append(w)
        else:
            groups.append([w])
    return [
        Segment(
            start=round(g[0].start, 2),
            end=round(g[-1].end, 2),
            text=" ".join(w.text for w in g),
            confidence=round(float(np.mean([w.prob for w in g])), 4),
            words=[Word(round(w.start, 2), round(w.end, 2), w.text, round(w.prob, 4)) for w in g],
        )
        for g in groups
    ]


def _read_dictionary(path: Path) -> list[tuple[str, str]]:
    """TRANSCRIBE_POCKETSPHINX_DICT: `word PH O N E S` per line; # starts a comment."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RecognizerConfigError(
            f"TRANSCRIBE_POCKETSPHINX_DICT={str(path)!r} cannot be read: {exc.strerror or exc}"
        ) from exc
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2:
            raise RecognizerConfigError(
                f"TRANSCRIBE_POCKETSPHINX_DICT {str(path)!r} line {number}: expected "
                f"'word PH O N E S', got {line!r}"
            )
        entries.append((parts[0].lower(), " ".join(p.upper() for p in parts[1:])))
    return entries
