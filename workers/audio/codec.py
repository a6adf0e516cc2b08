"""Decoding and the one conversion, with PyAV (FFmpeg's libraries, bundled; no ffmpeg binary).

Recognisers want 16 kHz mono 16-bit PCM. The conversion is made once, from the original as
served, into FLAC (lossless, about half the size of WAV): every extra lossy re-encode hurts
recognition. Everything here is CPU work and blocking file I/O: call it from an executor, never
on the event loop.

Decoding streams: each decoded frame is resampled and handed on (to a FLAC writer, a level
meter) and then dropped, so memory does not grow with the duration. A small file can decode to
hours (ten minutes of silence is 114 KB of FLAC), so decoding stops as soon as the decoded
samples pass the duration limit: the container's header is not trusted for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import av
import numpy as np

RECOGNIZER_RATE = 16000
# Past these, a stream is nonsense for radio calls (and each frame costs more to decode).
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8


class AudioDecodeError(ValueError):
    """The file is not audio we can decode (the message says why)."""


class AudioTooLong(AudioDecodeError):
    """More than the duration limit decoded; decoding stopped there."""

    def __init__(self, limit_sec: float, decoded_sec: float) -> None:
        super().__init__(f"decoded more than {limit_sec:g} s (stopped at {decoded_sec:.1f} s)")
        self.limit_sec = limit_sec
        self.decoded_sec = decoded_sec


class AudioUnsupported(AudioDecodeError):
    """Decodable, but with a layout no call has (sample rate or channel count)."""


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


@dataclass(frozen=True)
class StreamedAudio:
    """What a streamed decode found: the original's description and how much it sent on."""

    info: AudioInfo
    container: str
    samples_out: int  # mono samples at the output rate handed to the sink


def _check_layout(rate: int, channels: int) -> None:
    if not 0 < rate <= MAX_SAMPLE_RATE:
        raise AudioUnsupported(f"sample rate {rate} Hz (at most {MAX_SAMPLE_RATE} Hz)")
    if not 0 < channels <= MAX_CHANNELS:
        raise AudioUnsupported(f"{channels} channels (at most {MAX_CHANNELS})")


def stream_decode(
    path: Path | str,
    sink: Callable[[np.ndarray], None],
    rate: int = RECOGNIZER_RATE,
    *,
    max_duration_sec: float | None = None,
) -> StreamedAudio:
    """Decode the file's first audio stream once, frame by frame, resampled to `rate`, mono,
    int16, each piece handed to `sink` as it is made and not kept. Raises AudioTooLong as soon
    as more than max_duration_sec is decoded, AudioUnsupported for a nonsense layout, and
    AudioDecodeError for anything else the decoder refuses."""
    decoded_sec = 0.0
    samples_out = 0
    resampler: av.AudioResampler | None = None
    source: tuple[str, str, int] | None = None  # (format, layout, rate) the resampler takes

    def send(frames: list[av.AudioFrame]) -> None:
        nonlocal samples_out
        for out in frames:
            chunk = out.to_ndarray().reshape(-1)
            samples_out += chunk.size
            sink(chunk)

    try:
        # A tag that is not UTF-8 must not make the audio undecodable.
        with av.open(str(path), metadata_errors="replace") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            stream = container.streams.audio[0]
            if stream.codec_context is None:  # a damaged header can leave no decoder
                raise AudioDecodeError("the audio stream has no decoder")
            codec, in_rate, channels = stream.codec_context.name, stream.rate, stream.channels
            for frame in container.decode(stream):
                _check_layout(frame.sample_rate, frame.layout.nb_channels)
                decoded_sec += frame.samples / frame.sample_rate
                if max_duration_sec is not None and decoded_sec > max_duration_sec:
                    raise AudioTooLong(max_duration_sec, decoded_sec)
                layout = (frame.format.name, frame.layout.name, frame.sample_rate)
                if resampler is None or layout != source:  # the first frame, or a change
                    if resampler is not None:
                        send(resampler.resample(None))
                    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
                    source = layout
                send(resampler.resample(frame))
            if resampler is not None:
                send(resampler.resample(None))
            container_name = container.format.name
    except av.error.FFmpegError as exc:
        raise AudioDecodeError(f"undecodable: {exc}") from exc
    info = AudioInfo(codec, in_rate, channels, decoded_sec)
    return StreamedAudio(info, container_name, samples_out)


def decode(
    path: Path | str, rate: int = RECOGNIZER_RATE, *, max_duration_sec: float | None = None
) -> DecodedAudio:
    """Decode the file's first audio stream once: its description and every sample, resampled
    to `rate`, mono, int16, all in memory (for files already known to be short, such as the
    prepared FLAC; the audio stage streams instead)."""
    chunks: list[np.ndarray] = []
    streamed = stream_decode(
        path, lambda c: chunks.append(c.copy()), rate, max_duration_sec=max_duration_sec
    )
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return DecodedAudio(streamed.info, streamed.container, samples.astype(np.int16), rate)


def decode_mono(path: Path | str, rate: int = RECOGNIZER_RATE) -> np.ndarray:
    """Every sample of the file's first audio stream, resampled to `rate`, mono, int16."""
    return decode(path, rate).samples


def decode_prepared(path: Path | str) -> np.ndarray:
    """A prepared call's samples for a recogniser (16 kHz, mono, int16); AudioDecodeError for
    a file that is not audio at all (such a file can open as an empty stream)."""
    samples = decode_mono(path, RECOGNIZER_RATE)
    if samples.size == 0 and probe(path).sample_rate == 0:
        raise AudioDecodeError("no audio stream with a sample rate")
    return samples


class LoudestWindow:
    """RMS level of the loudest `window_sec` stretch, in dB full scale (-inf for no sound),
    fed piece by piece.

    Radio calls open and close with squelch silence, and a whole-file average would let a
    short call drown in it; the loudest window says whether anything was said at all.
    Windows are consecutive, from the first sample; a tail shorter than a window counts only
    when there is no whole window (then the whole of it is the window)."""

    def __init__(self, rate: int, window_sec: float = 0.1) -> None:
        self.size = max(1, int(rate * window_sec))
        self.pending = np.zeros(0, dtype=np.int16)
        self.loudest_ms = -1.0  # mean square of the loudest whole window; -1: none yet

    def add(self, samples: np.ndarray) -> None:
        data = np.concatenate([self.pending, samples]) if self.pending.size else samples
        count = data.size // self.size
        if count:
            windows = data[: count * self.size].astype(np.float64).reshape(count, self.size)
            self.loudest_ms = max(self.loudest_ms, float((windows**2).mean(axis=1).max()))
        self.pending = data[count * self.size :].copy()

    def dbfs(self) -> float:
        ms = self.loudest_ms
        if ms < 0:  # shorter than one window: the whole of it
            ms = float((self.pending.astype(np.float64) ** 2).mean()) if self.pending.size else 0
        rms = float(np.sqrt(ms))
        return 20 * float(np.log10(rms / 32768.0)) if rms > 0 else float("-inf")


def loudest_window_dbfs(samples: np.ndarray, rate: int, window_sec: float = 0.1) -> float:
    """RMS level of the loudest `window_sec` stretch of `samples` (see LoudestWindow)."""
    meter = LoudestWindow(rate, window_sec)
    meter.add(samples)
    return meter.dbfs()


def probe(path: Path | str) -> AudioInfo:
    """Codec and layout from the container, duration from decoding every frame."""
    return stream_decode(path, lambda _: None).info


class FlacWriter:
    """Mono int16 samples to a FLAC file, piece by piece; a writer left by an exception
    removes its file, so no partial output remains."""

    FRAME = 4096

    def __init__(self, path: Path | str, rate: int = RECOGNIZER_RATE) -> None:
        self.path = Path(path)
        self.rate = rate
        self.written = 0
        self.container = av.open(str(path), "w", format="flac")
        self.stream = self.container.add_stream("flac", rate=rate, layout="mono")

    def write(self, samples: np.ndarray) -> None:
        for start in range(0, len(samples), self.FRAME):
            chunk = np.ascontiguousarray(samples[start : start + self.FRAME]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = self.rate
            frame.pts = self.written
            self.written += chunk.shape[1]
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        """Drop the file; what went wrong before is the error that counts, not this."""
        with contextlib.suppress(Exception):
            self.container.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FlacWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


def write_flac(samples: np.ndarray, path: Path | str, rate: int = RECOGNIZER_RATE) -> None:
    """Mono int16 samples to a FLAC file."""
    with FlacWriter(path, rate) as writer:
        writer.write(samples)


def convert_for_recognizers(src: Path | str, dst: Path | str) -> np.ndarray:
    """The one conversion: the original to 16 kHz mono FLAC. Returns the samples written."""
    samples = decode_mono(src, RECOGNIZER_RATE)
    write_flac(samples, dst, RECOGNIZER_RATE)
    return samples


def pieces_at_pauses(
    samples: np.ndarray, max_sec: float, rate: int = RECOGNIZER_RATE, search_sec: float = 5.0
) -> list[tuple[int, int]]:
    """Sample ranges of at most `max_sec` covering the audio, each cut at the quietest 10 ms in
    the last `search_sec` of its window (a pause, in speech). Recognisers decode long calls
    piece by piece, so that their memory does not grow with the call."""
    n, limit = len(samples), int(max_sec * rate)
    frame = rate // 100
    bounds, start = [], 0
    while n - start > limit:
        lo, hi = start + limit - int(search_sec * rate), start + limit
        window = samples[lo:hi].astype(np.float32)
        energy = (window[: len(window) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        bounds.append((start, cut))
        start = cut
    if n > start or not bounds:
        bounds.append((start, n))
    return bounds
