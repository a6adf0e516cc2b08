"""Decoding and the one conversion, with PyAV (FFmpeg's libraries, bundled; no ffmpeg binary).

Recognisers want 16 kHz mono 16-bit PCM. The conversion is made once, from the original as
served, into FLAC (lossless, about half the size of WAV): every extra lossy re-encode hurts
recognition. Everything here is CPU work and blocking file I/O: call it from an executor, never
on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

RECOGNIZER_RATE = 16000


class AudioDecodeError(ValueError):
    """The file is not audio we can decode (the message says why)."""


@dataclass(frozen=True)
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int
    duration_sec: float  # measured by decoding, not from the container's header


@dataclass(frozen=True)
class DecodedAudio:
    """One decoding pass over a file: what it is, and its samples as recognisers want them."""

    info: AudioInfo  # of the original: codec, rate, channels, measured duration
    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "mp3"
    samples: np.ndarray  # mono int16 at `rate`
    rate: int


def decode(path: Path | str, rate: int = RECOGNIZER_RATE) -> DecodedAudio:
    """Decode the file's first audio stream once: its description and every sample, resampled
    to `rate`, mono, int16. Validation and the conversion both use this one pass."""
    chunks: list[np.ndarray] = []
    samples_in = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            stream = container.streams.audio[0]
            codec, in_rate, channels = stream.codec_context.name, stream.rate, stream.channels
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in container.decode(stream):
                samples_in += frame.samples
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
            container_name = container.format.name
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(f"undecodable: {exc}") from exc
    samples = (
        np.concatenate(chunks).astype(np.int16, copy=False)
        if chunks
        else np.zeros(0, dtype=np.int16)
    )
    duration = samples_in / in_rate if in_rate else 0.0
    return DecodedAudio(
        AudioInfo(codec, in_rate, channels, duration), container_name, samples, rate
    )


def decode_mono(path: Path | str, rate: int = RECOGNIZER_RATE) -> np.ndarray:
    """Every sample of the file's first audio stream, resampled to `rate`, mono, int16."""
    return decode(path, rate).samples


def loudest_window_dbfs(samples: np.ndarray, rate: int, window_sec: float = 0.1) -> float:
    """RMS level of the loudest `window_sec` stretch, in dB full scale (-inf for no sound).

    Radio calls open and close with squelch silence, and a whole-file average would let a
    short call drown in it; the loudest window says whether anything was said at all."""
    if samples.size == 0:
        return float("-inf")
    size = max(1, min(int(rate * window_sec), samples.size))
    count = samples.size // size
    windows = samples[: count * size].astype(np.float64).reshape(count, size)
    rms = float(np.sqrt((windows**2).mean(axis=1)).max())
    return 20 * float(np.log10(rms / 32768.0)) if rms > 0 else float("-inf")


def probe(path: Path | str) -> AudioInfo:
    """Codec and layout from the container, duration from decoding every frame."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            stream = container.streams.audio[0]
            codec, rate, channels = stream.codec_context.name, stream.rate, stream.channels
            samples = 0
            for frame in container.decode(stream):
                samples += frame.samples
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(f"undecodable: {exc}") from exc
    return AudioInfo(codec, rate, channels, samples / rate if rate else 0.0)


def write_flac(samples: np.ndarray, path: Path | str, rate: int = RECOGNIZER_RATE) -> None:
    """Mono int16 samples to a FLAC file."""
    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono")
        frame_size = 4096
        for start in range(0, len(samples), frame_size):
            chunk = np.ascontiguousarray(samples[start : start + frame_size]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def convert_for_recognizers(src: Path | str, dst: Path | str) -> np.ndarray:
    """The one conversion: the original to 16 kHz mono FLAC. Returns the samples written."""
    samples = decode_mono(src, RECOGNIZER_RATE)
    write_flac(samples, dst, RECOGNIZER_RATE)
    return samples
