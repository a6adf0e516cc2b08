"""Which of Whisper's segments a transcript keeps: one rule for both Whisper-class backends
(`whisper`, embedded, and `openai`, whose verbose_json carries the same figures).

Whisper writes something whatever it hears: "You" on silence or hiss, "Thanks for watching" on
a tone, a phrase repeated to the end of the window, guesses where it is unsure. Voice activity
detection (the whisper backend) keeps most of that from being recognised at all; what still
comes out is judged by the model's own figures for each segment. A segment is dropped when
  - its `no_speech_prob` is above TRANSCRIBE_NO_SPEECH_THRESHOLD (probably not speech),
  - its `avg_logprob` is below TRANSCRIBE_LOGPROB_THRESHOLD (the text is probably wrong),
  - its `compression_ratio` is above TRANSCRIBE_COMPRESSION_RATIO_THRESHOLD (a loop),
  - its whole text is a phrase of TRANSCRIBE_BLOCKLIST (case and punctuation ignored),
  - or it has no words at all (only punctuation).
Dropped segments are not lost: they are stored beside the transcript with the reason
(transcripts.dropped_segments), so the thresholds can be tuned from what they removed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from workers.core.settings import TranscriptionSettings
from workers.recognizers import DroppedSegment, Segment, Word, vocabulary_terms

_NOT_A_WORD_CHAR = re.compile(r"[^\w\s']+")


@dataclass(frozen=True)
class Candidate:
    """A segment as Whisper gave it, before it is judged."""

    start: float
    end: float
    text: str
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    words: list[Word] = field(default_factory=list)


def normalised(text: str) -> str:
    """Lower case, punctuation gone, blanks collapsed: "Thank you." -> "thank you"."""
    return " ".join(_NOT_A_WORD_CHAR.sub(" ", text.lower()).replace("_", " ").split())


@dataclass(frozen=True)
class SegmentFilter:
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    blocklist: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, t: TranscriptionSettings) -> SegmentFilter:
        return cls(
            no_speech_threshold=t.no_speech_threshold,
            logprob_threshold=t.logprob_threshold,
            compression_ratio_threshold=t.compression_ratio_threshold,
            blocklist=frozenset(n for n in map(normalised, vocabulary_terms(t.blocklist)) if n),
        )

    def why_dropped(self, c: Candidate) -> str | None:
        """The reason this segment is not believed, or None to keep it."""
        if c.no_speech_prob is not None and c.no_speech_prob > self.no_speech_threshold:
            return f"no_speech_prob {c.no_speech_prob:.2f} > {self.no_speech_threshold:g}"
        if c.avg_logprob is not None and c.avg_logprob < self.logprob_threshold:
            return f"avg_logprob {c.avg_logprob:.2f} < {self.logprob_threshold:g}"
        if (
            c.compression_ratio is not None
            and c.compression_ratio > self.compression_ratio_threshold
        ):
            return (
                f"compression_ratio {c.compression_ratio:.2f} > "
                f"{self.compression_ratio_threshold:g}"
            )
        words = normalised(c.text)
        if not words:
            return "no words"
        if words in self.blocklist:
            return "blocklisted phrase"
        return None


@dataclass(frozen=True)
class Judged:
    segments: list[Segment]
    dropped: list[DroppedSegment]
    confidence: float | None  # exp of the duration-weighted mean avg_logprob of the kept ones

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


def judge(candidates: list[Candidate], rule: SegmentFilter) -> Judged:
    """The segments kept, in order, and those dropped with their reasons. Times in seconds,
    rounded to 10 ms."""
    kept: list[Segment] = []
    dropped: list[DroppedSegment] = []
    weighted, total = 0.0, 0.0
    for c in candidates:
        text = " ".join(c.text.split())
        if not text:
            continue
        start, end = round(c.start, 2), round(c.end, 2)
        why = rule.why_dropped(c)
        if why is not None:
            dropped.append(DroppedSegment(start, end, text, why))
            continue
        confidence = unit(math.exp(c.avg_logprob)) if c.avg_logprob is not None else None
        kept.append(Segment(start, end, text, confidence, c.words))
        if c.avg_logprob is not None:
            weight = max(c.end - c.start, 0.01)
            weighted += c.avg_logprob * weight
            total += weight
    return Judged(kept, dropped, unit(math.exp(weighted / total)) if total else None)


def unit(value: float) -> float:
    """A probability, clamped to 0..1 and rounded for storage."""
    return round(min(1.0, max(0.0, value)), 4)
