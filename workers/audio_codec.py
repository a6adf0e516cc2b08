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


def decode_mono(path: Path | str, rate: int = RECOGNIZER_RATE) -> np.ndarray:
    """Every sample of the file's first audio stream, resampled to `rate`, mono, int16."""
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(f"undecodable: {exc}") from exc
    if not chunks:
        return np.zeros(0, dtype=np.int16)
    return np.concatenate(chunks).astype(np.int16, copy=False)


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
