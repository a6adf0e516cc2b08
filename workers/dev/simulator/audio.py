"""The simulator's audio: the spoken clips in clips/, and the bytes each AudioFault serves."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLIPS_DIR = Path(__file__).resolve().parent / "clips"
TRUNCATED_FRACTION = 0.4
_FILLER = random.Random(0).randbytes(64 * 1024)


@dataclass(frozen=True)
class Clip:
    file: str
    data: bytes
    duration: float  # seconds, measured when the clip was made (clips.json)
    text: str

    @property
    def size(self) -> int:
        return len(self.data)


def load_clips() -> tuple[list[Clip], Clip]:
    """The spoken clips, in clips.json's order, and the silent one."""
    index = json.loads((CLIPS_DIR / "clips.json").read_text())
    clips = [
        Clip(c["file"], (CLIPS_DIR / c["file"]).read_bytes(), float(c["duration"]), c["text"])
        for c in index["clips"]
    ]
    s = index["silence"]
    silence = Clip(s["file"], (CLIPS_DIR / s["file"]).read_bytes(), float(s["duration"]), "")
    return clips, silence


def truncated(clip: Clip) -> bytes:
    return clip.data[: int(clip.size * TRUNCATED_FRACTION)]


def oversize_stream(clip: Clip, total: int) -> Iterator[bytes]:
    """`total` bytes that look like the start of a long .m4a: the clip's `ftyp` box, then an
    `mdat` box declared to hold the rest, filled with noise. Made lazily, 64 KiB at a time."""
    ftyp_size = int.from_bytes(clip.data[:4], "big")
    head = clip.data[:ftyp_size] + (total - ftyp_size).to_bytes(4, "big") + b"mdat"
    head = head[:total]
    yield head
    left = total - len(head)
    while left > 0:
        chunk = _FILLER[: min(left, len(_FILLER))]
        left -= len(chunk)
        yield chunk


WRONG_TYPE_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head>\n"
    b"<body><h1>Service Unavailable</h1><p>The audio server is temporarily unable to"
    b" service your request. Please try again later.</p></body></html>\n"
)
