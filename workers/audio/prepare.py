"""Validation with the real decoder, and the one conversion, from one decoding pass.

The downloaded original is decoded once (PyAV), streaming: each decoded piece goes straight to
the 16 kHz mono FLAC being written and to a level meter, so memory does not grow with the
duration. The decoded audio must be
  * decodable, with an audio stream and at least one sample, at a sample rate and channel
    count a call can have;
  * no longer than AUDIO_MAX_DURATION_SEC, counted in decoded samples (the container's header
    may lie): decoding stops as soon as it is passed;
  * as long as the API said, within AUDIO_DURATION_TOLERANCE (a truncated file decodes fine
    but comes out short);
  * not silent from end to end (some 100 ms window louder than AUDIO_SILENCE_DBFS);
and when any check fails the FLAC written so far is removed: no partial output. Blocking CPU
work: run it in an executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.audio.codec import (
    RECOGNIZER_RATE,
    AudioDecodeError,
    AudioTooLong,
    AudioUnsupported,
    FlacWriter,
    LoudestWindow,
    StreamedAudio,
    stream_decode,
)
from workers.audio.download import AudioFailure, refused
from workers.audio.store import file_digest, sync_file

# FFmpeg demuxer name -> the extension the original is stored under.
EXTENSIONS = {"mp3": "mp3", "aac": "aac", "wav": "wav", "ogg": "ogg", "flac": "flac"}
# Every extension extension_for can give.
ORIGINAL_EXTENSIONS = ("m4a", *EXTENSIONS.values(), "bin")


@dataclass(frozen=True)
class PreparedAudio:
    codec: str
    extension: str  # of the original, from what it is, not from its URL
    duration_sec: float  # measured by decoding
    loudest_dbfs: float
    flac_bytes: int
    flac_sha256: str


def extension_for(container: str) -> str:
    if "mp4" in container.split(",") or "m4a" in container.split(","):
        return "m4a"
    return EXTENSIONS.get(container.split(",")[0], "bin")


def validate_and_convert(
    original: Path,
    flac_out: Path,
    *,
    expected_duration: float | None,
    tolerance: float,
    silence_dbfs: float,
    max_duration_sec: float,
) -> PreparedAudio:
    """Check the original and write its 16 kHz mono FLAC to flac_out. Raises AudioFailure
    (and then flac_out does not exist)."""
    meter = LoudestWindow(RECOGNIZER_RATE)
    with FlacWriter(flac_out, RECOGNIZER_RATE) as writer:  # removed if anything below raises

        def sink(samples: np.ndarray) -> None:
            writer.write(samples)
            meter.add(samples)

        decoded = _decode(original, sink, max_duration_sec)
        _check(decoded, meter, expected_duration, tolerance, silence_dbfs)
    sync_file(flac_out)  # now, not later while the call's row is locked
    size, sha = file_digest(flac_out)
    return PreparedAudio(
        codec=decoded.info.codec,
        extension=extension_for(decoded.container),
        duration_sec=decoded.info.duration_sec,
        loudest_dbfs=meter.dbfs(),
        flac_bytes=size,
        flac_sha256=sha,
    )


def _decode(
    original: Path, sink: Callable[[np.ndarray], None], max_duration_sec: float
) -> StreamedAudio:
    try:
        return stream_decode(original, sink, RECOGNIZER_RATE, max_duration_sec=max_duration_sec)
    except AudioTooLong as exc:
        raise refused(
            "too_long",
            f"longer than AUDIO_MAX_DURATION_SEC ({exc.limit_sec:g} s): decoding stopped at "
            f"{exc.decoded_sec:.1f} s",
        ) from None
    except AudioUnsupported as exc:
        raise refused("unsupported_audio", str(exc)) from None
    except AudioDecodeError as exc:
        raise AudioFailure("not_audio", str(exc)) from None


def _check(
    decoded: StreamedAudio,
    meter: LoudestWindow,
    expected_duration: float | None,
    tolerance: float,
    silence_dbfs: float,
) -> None:
    measured = decoded.info.duration_sec
    if decoded.samples_out == 0 or measured <= 0:
        raise AudioFailure("not_audio", f"no audio samples ({decoded.info.codec})")
    if expected_duration and expected_duration > 0:
        off = abs(measured - expected_duration) / expected_duration
        if off > tolerance:
            raise AudioFailure(
                "duration_mismatch",
                f"decoded {measured:.2f}s, the API says {expected_duration:.2f}s "
                f"({off:.0%} off; at most {tolerance:.0%})",
            )
    loudest = meter.dbfs()
    if loudest < silence_dbfs:
        raise AudioFailure(
            "silence",
            f"silent from end to end: loudest 100 ms at {loudest:.1f} dBFS "
            f"(threshold {silence_dbfs:g} dBFS) over {measured:.2f}s",
        )
