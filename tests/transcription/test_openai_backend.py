"""The openai backend against a local OpenAI-compatible service over real HTTP."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from tasks.transcription.policy import retry_wait
from tests.transcription.fake_openai import Reply, verbose_json
from workers.core.settings import SettingsError, load_settings
from workers.recognizers import (
    PermanentRecognitionError,
    TransientRecognitionError,
    build_recognizer,
)

KEY = "sk-test-abc123"


@pytest.fixture
def openai(service, use_env):
    settings = use_env(
        TRANSCRIBE_BACKEND="openai",
        TRANSCRIBE_OPENAI_BASE_URL=service.base_url,
        TRANSCRIBE_OPENAI_API_KEY=KEY,
        TRANSCRIBE_OPENAI_MODEL="whisper-large-v3",
        TRANSCRIBE_VOCABULARY="Medic 3, Oak Avenue,  Engine 12 ",
        TRANSCRIBE_OPENAI_TIMEOUT_SEC="2",
    )
    return build_recognizer(settings.transcription), settings


@pytest.fixture
def audio(prepared_clips: Path) -> Path:
    return prepared_clips / "prepared" / "call01.flac"


def test_the_request_is_a_multipart_upload_and_verbose_json_is_parsed(openai, service, audio):
    recognizer, _ = openai
    service.replies.append(
        Reply(
            body=verbose_json(
                [
                    {"start": 0.0, "end": 2.5, "text": " Engine 12 respond,", "avg_logprob": -0.1},
                    # Hiss after the transmission: Whisper's classic invention.
                    {
                        "start": 2.5,
                        "end": 4.0,
                        "text": " Thank you for watching.",
                        "avg_logprob": -0.9,
                        "no_speech_prob": 0.93,
                    },
                    {"start": 4.0, "end": 5.4, "text": " structure fire.", "avg_logprob": -0.4},
                ]
            )
        )
    )
    result = recognizer.transcribe(audio, name="call-7.flac")

    (req,) = service.requests
    assert req.path == "/v1/audio/transcriptions"
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert req.fields["model"] == "whisper-large-v3"
    assert req.fields["language"] == "en"
    assert req.fields["response_format"] == "verbose_json"
    assert req.fields["prompt"] == "Medic 3, Oak Avenue, Engine 12."
    assert (req.file_name, req.file_type) == ("call-7.flac", "audio/flac")
    assert req.file_bytes == audio.read_bytes() and req.file_bytes.startswith(b"fLaC")

    assert result.text == "Engine 12 respond, structure fire."
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 2.5), (4.0, 5.4)]
    assert result.segments[0].confidence == pytest.approx(math.exp(-0.1), abs=1e-4)
    # Duration-weighted mean log-probability of the kept segments only.
    expected = math.exp((-0.1 * 2.5 + -0.4 * 1.4) / 3.9)
    assert result.confidence == pytest.approx(expected, abs=1e-4)
    assert (result.model, result.language) == ("whisper-large-v3", "english")
    assert result.audio_duration_sec == 5.4


def test_the_silence_threshold_is_a_setting(service, use_env, audio):
    settings = use_env(
        TRANSCRIBE_BACKEND="openai",
        TRANSCRIBE_OPENAI_BASE_URL=service.base_url,
        TRANSCRIBE_NO_SPEECH_THRESHOLD="0.3",
    )
    segments = [
        {"start": 0.0, "end": 1.0, "text": "copy", "no_speech_prob": 0.2},
        {"start": 1.0, "end": 2.0, "text": "maybe speech", "no_speech_prob": 0.4},
    ]
    service.replies.append(Reply(body=verbose_json(segments)))
    result = build_recognizer(settings.transcription).transcribe(audio, name="x.flac")
    assert result.text == "copy"
    assert "Authorization" not in service.requests[0].headers, "no key configured, none sent"
    assert "prompt" not in service.requests[0].fields


def test_only_silence_gives_an_empty_transcript(openai, service, audio):
    recognizer, _ = openai
    hiss = [{"start": 0.0, "end": 3.0, "text": " you", "no_speech_prob": 0.97}]
    service.replies.append(Reply(body=verbose_json(hiss)))
    result = recognizer.transcribe(audio, name="x.flac")
    assert (result.text, result.segments, result.confidence) == ("", [], None)
    assert result.empty_reason == "dropped" and result.dropped[0].text == "you"


def test_words_and_the_segment_rule(service, use_env, audio):
    settings = use_env(
        TRANSCRIBE_BACKEND="openai",
        TRANSCRIBE_OPENAI_BASE_URL=service.base_url,
        TRANSCRIBE_BLOCKLIST="thanks for watching",
    )
    body = verbose_json(
        [
            {"start": 0.0, "end": 1.2, "text": " Engine 12, copy."},
            {"start": 1.2, "end": 2.0, "text": " mains trees", "avg_logprob": -1.6},
            {"start": 2.0, "end": 6.0, "text": " fire" * 40, "compression_ratio": 9.1},
            {"start": 6.0, "end": 7.0, "text": " Thanks for watching!"},
        ]
    )
    # OpenAI sends words as a list of their own, beside the segments.
    body["words"] = [
        {"word": "Engine", "start": 0.0, "end": 0.5},
        {"word": "12", "start": 0.5, "end": 0.8},
        {"word": "copy", "start": 0.9, "end": 1.2},
        {"word": "mains", "start": 1.2, "end": 1.6},
        {"word": None, "start": "x"},  # a malformed one is skipped
    ]
    service.replies.append(Reply(body=body))
    result = build_recognizer(settings.transcription).transcribe(audio, name="x.flac")
    assert service.requests[0].repeated["timestamp_granularities[]"] == ["segment", "word"]
    (kept,) = result.segments
    assert kept.text == "Engine 12, copy."
    assert [(w.text, w.start, w.end) for w in kept.words] == [
        ("Engine", 0.0, 0.5),
        ("12", 0.5, 0.8),
        ("copy", 0.9, 1.2),
    ]
    assert [d.reason for d in result.dropped] == [
        "avg_logprob -1.60 < -1",
        "compression_ratio 9.10 > 2.4",
        "blocklisted phrase",
    ]
    assert result.empty_reason is None


def test_a_server_without_verbose_json_still_gives_the_text(openai, service, audio):
    recognizer, _ = openai
    service.replies.append(Reply(body={"text": "  Medic 3 en route. "}))
    result = recognizer.transcribe(audio, name="x.flac")
    assert (result.text, result.segments, result.confidence) == ("Medic 3 en route.", [], None)


def test_429_is_transient_and_its_retry_after_is_honoured(openai, service, audio):
    recognizer, settings = openai
    service.replies.append(
        Reply(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "42"})
    )
    with pytest.raises(TransientRecognitionError, match="429 rate limited: Rate limit") as err:
        recognizer.transcribe(audio, name="x.flac")
    assert err.value.retry_after == 42
    # The retry waits at least that long, even on the first attempt (15 s backoff).
    assert retry_wait(1, settings, err.value.retry_after) >= 42

    later = datetime.now(UTC) + timedelta(seconds=90)
    service.replies.append(Reply(429, {}, {"Retry-After": format_datetime(later, usegmt=True)}))
    with pytest.raises(TransientRecognitionError) as err:
        recognizer.transcribe(audio, name="x.flac")
    assert 80 <= (err.value.retry_after or 0) <= 91


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient(openai, service, audio, status):
    recognizer, _ = openai
    service.replies.append(Reply(status, {"error": {"message": "overloaded"}}))
    with pytest.raises(TransientRecognitionError, match=f"HTTP {status}: overloaded"):
        recognizer.transcribe(audio, name="x.flac")


@pytest.mark.parametrize("status", [400, 401, 413])
def test_refusals_are_permanent_with_the_services_reason(openai, service, audio, status):
    recognizer, _ = openai
    service.replies.append(Reply(status, {"error": {"message": "Invalid file format."}}))
    with pytest.raises(PermanentRecognitionError, match=f"HTTP {status}: Invalid file format") as e:
        recognizer.transcribe(audio, name="x.flac")
    assert KEY not in str(e.value)


def test_an_answer_that_is_not_json_is_permanent(openai, service, audio):
    recognizer, _ = openai
    service.replies.append(Reply(body="Engine 12 respond"))
    with pytest.raises(PermanentRecognitionError, match="not JSON"):
        recognizer.transcribe(audio, name="x.flac")


def test_a_service_that_does_not_answer_times_out(openai, service, audio):
    recognizer, _ = openai  # TRANSCRIBE_OPENAI_TIMEOUT_SEC=2
    # The answer comes after twice the timeout: a client that waited longer (another timeout
    # than the setting's, none, a retry inside) would get it and not raise.
    service.replies.append(Reply(delay=4))
    with pytest.raises(TransientRecognitionError, match="no answer within 2s"):
        recognizer.transcribe(audio, name="x.flac")
    assert len(service.requests) == 1, "given up on, not asked again"


def test_a_service_that_is_down_is_transient(use_env, audio):
    settings = use_env(
        TRANSCRIBE_BACKEND="openai", TRANSCRIBE_OPENAI_BASE_URL="http://127.0.0.1:9/v1"
    )
    with pytest.raises(TransientRecognitionError, match="ConnectError"):
        build_recognizer(settings.transcription).transcribe(audio, name="x.flac")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRANSCRIBE_BACKEND": "whisperx"}, "TRANSCRIBE_BACKEND"),
        ({"TRANSCRIBE_BACKEND": "openai"}, "TRANSCRIBE_OPENAI_API_KEY"),
        (
            {"TRANSCRIBE_BACKEND": "openai", "TRANSCRIBE_OPENAI_BASE_URL": "localhost:8000"},
            "TRANSCRIBE_OPENAI_BASE_URL",
        ),
        (
            {
                "TRANSCRIBE_BACKEND": "openai",
                "TRANSCRIBE_OPENAI_BASE_URL": "http://whisper:8000/v1",
                "TRANSCRIBE_OPENAI_TIMEOUT_SEC": "250",
            },
            "TRANSCRIBE_OPENAI_TIMEOUT_SEC",
        ),
        ({"TRANSCRIBE_LANGUAGE": "de"}, "TRANSCRIBE_LANGUAGE"),
        ({"TRANSCRIBE_TIME_LIMIT_SEC": "3600"}, "BROKER_VISIBILITY_TIMEOUT_SEC"),
        ({"TRANSCRIBE_RETRY_BACKOFF_MAX_SEC": "2000"}, "TRANSCRIBE_RETRY_BACKOFF_MAX_SEC"),
        ({"TRANSCRIBE_SOFT_TIME_LIMIT_SEC": "300"}, "TRANSCRIBE_SOFT_TIME_LIMIT_SEC"),
    ],
)
def test_a_misconfigured_backend_is_refused_by_name(env, named):
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_the_api_key_is_a_secret():
    s = load_settings(
        {
            "TRANSCRIBE_BACKEND": "openai",
            "TRANSCRIBE_OPENAI_API_KEY": KEY,
        }
    )
    assert KEY not in repr(s) and KEY not in str(s.describe())
    assert s.describe()["TRANSCRIBE_OPENAI_API_KEY"] == "***"
