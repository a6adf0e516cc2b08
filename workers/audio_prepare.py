"""Validation with the real decoder, and the one conversion, from one decoding pass.

The downloaded original is decoded once (PyAV); the decoded audio must be
  * decodable, with an audio stream and at least one sample;
  * as long as the API said, within AUDIO_DURATION_TOLERANCE (a truncated file decodes fine
    but comes out short);
  * not silent from end to end (some 100 ms window louder than AUDIO_SILENCE_DBFS);
and only then is the 16 kHz mono FLAC written, from those same samples. Blocking CPU work: run
it in an executor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workers.audio_codec import AudioDecodeError, decode, loudest_window_dbfs, write_flac
from workers.audio_download import AudioFailure
from workers.audio_store import file_digest, sync_file

# FFmpeg demuxer name -> the extension the original is stored under.
EXTENSIONS = {"mp3": "mp3", "aac": "aac", "wav": "wav", "ogg": "ogg", "flac": "flac"}


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
) -> PreparedAudio:
    """Check the original and write its 16 kHz mono FLAC to flac_out. Raises AudioFailure."""
    try:
        decoded = decode(original)
    except AudioDecodeError as exc:
        raise AudioFailure("not_audio", str(exc)) from None
    measured = decoded.info.duration_sec
    if decoded.samples.size == 0 or measured <= 0:
        raise AudioFailure("not_audio", f"no audio samples ({decoded.info.codec})")
    if expected_duration and expected_duration > 0:
        off = abs(measured - expected_duration) / expected_duration
        if off > tolerance:
            raise AudioFailure(
                "duration_mismatch",
                f"decoded {measured:.2f}s, the API says {expected_duration:.2f}s "
                f"({off:.0%} off; at most {tolerance:.0%})",
            )
    loudest = loudest_window_dbfs(decoded.samples, decoded.rate)
    if loudest < silence_dbfs:
        raise AudioFailure(
            "silence",
            f"silent from end to end: loudest 100 ms at {loudest:.1f} dBFS "
            f"(threshold {silence_dbfs:g} dBFS) over {measured:.2f}s",
        )
    write_flac(decoded.samples, flac_out, decoded.rate)
    sync_file(flac_out)  # now, not later while the call's row is locked
    size, sha = file_digest(flac_out)
    return PreparedAudio(
        codec=decoded.info.codec,
        extension=extension_for(decoded.container),
        duration_sec=measured,
        loudest_dbfs=loudest,
        flac_bytes=size,
        flac_sha256=sha,
    )
