"""The embedded recogniser, for real: PocketSphinx with its bundled model on the spoken test calls.

The calls were synthesised from known text (workers/dev/simulator/clips/clips.json) and served as
AAC; here they go through the pipeline's one conversion to 16 kHz FLAC first.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.speech import words_found
from tests.transcription.conftest import CLIP_TEXT, flac, recognise_spoken_calls
from workers.audio.codec import decode_mono
from workers.core.settings import load_settings
from workers.recognizers import RecognizerConfigError, build_recognizer
from workers.recognizers.pocketsphinx_backend import PocketsphinxRecognizer

POCKETSPHINX = {"TRANSCRIBE_BACKEND": "pocketsphinx"}


@pytest.fixture(scope="module")
def recognizer() -> PocketsphinxRecognizer:
    return PocketsphinxRecognizer()


def test_the_spoken_calls_are_recognised(recognizer, prepared_clips, record_property):
    share = recognise_spoken_calls(recognizer, prepared_clips, "pocketsphinx-")
    record_property("pocketsphinx_words_found", f"{share:.0%}")
    # Measured 90/162 (56%) with pocketsphinx 5.1.1, words compared as written; a broken
    # pipeline (wrong rate, wrong byte order, a lost channel) recognises next to nothing.
    assert share >= 0.45


def test_silence_gives_an_empty_transcript(recognizer, prepared_clips):
    result = recognizer.transcribe(flac(prepared_clips, "silence.m4a"), name="silence")
    assert result.text == "" and result.segments == [] and result.confidence is None
    assert result.audio_duration_sec == pytest.approx(3.0, abs=0.1)


def test_custom_vocabulary_makes_its_phrases_recognisable(recognizer, prepared_clips):
    phrases = {"call02.m4a": "medic three", "call06.m4a": "ladder seven"}
    phrases["call11.m4a"] = "battalion chief"
    tuned = PocketsphinxRecognizer(vocabulary=list(phrases.values()))
    for clip, phrase in phrases.items():
        plain = recognizer.transcribe(flac(prepared_clips, clip), name=clip).text
        with_vocabulary = tuned.transcribe(flac(prepared_clips, clip), name=clip).text
        assert phrase not in plain, f"{clip}: {plain!r}"
        assert phrase in with_vocabulary, f"{clip}: {with_vocabulary!r}"


def test_a_pronunciation_file_adds_words_the_model_lacks(prepared_clips, tmp_path):
    extra = tmp_path / "extra.dict"
    extra.write_text("# a local street, said as one word\noakave OW K AE V AH N UW\n")
    assert PocketsphinxRecognizer().decoder.lookup_word("oakave") is None
    tuned = PocketsphinxRecognizer(vocabulary=["oakave"], extra_dict=extra)
    text = tuned.transcribe(flac(prepared_clips, "call06.m4a"), name="call06").text
    assert "oakave" in text.split(), text


def test_a_long_call_is_decoded_in_pieces_with_times_across_the_whole_call(
    recognizer, prepared_clips
):
    clips = ["call01.m4a", "call10.m4a", "call12.m4a", "call14.m4a", "call02.m4a"]
    gap = np.zeros(8000, dtype=np.int16)
    parts = []
    for clip in clips * 2:
        parts += [decode_mono(flac(prepared_clips, clip)), gap]
    samples = np.concatenate(parts)
    assert len(samples) / 16000 > 45  # two pieces at least
    result = recognizer.recognize_samples(samples)
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)
    assert result.segments[-1].end > 40, "words late in the call keep their time"
    reference = " ".join(CLIP_TEXT[c] for c in clips * 2)
    hit, said = words_found(reference, result.text)
    assert hit / said >= 0.45


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({**POCKETSPHINX, "TRANSCRIBE_VOCABULARY": "Medic 3"}, "TRANSCRIBE_VOCABULARY"),
        (
            {**POCKETSPHINX, "TRANSCRIBE_POCKETSPHINX_DICT": "/nonexistent/extra.dict"},
            "TRANSCRIBE_POCKETSPHINX_DICT",
        ),
    ],
)
def test_a_misconfigured_pocketsphinx_names_the_setting(env, named):
    with pytest.raises(RecognizerConfigError, match=named):
        build_recognizer(load_settings(env).transcription)


def test_a_malformed_pronunciation_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.dict"
    bad.write_text("okword OW K\nlonely\n")
    with pytest.raises(RecognizerConfigError, match="line 2"):
        settings = load_settings({**POCKETSPHINX, "TRANSCRIBE_POCKETSPHINX_DICT": str(bad)})
        build_recognizer(settings.transcription)
