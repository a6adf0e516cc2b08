"""The one conversion: the served AAC becomes 16 kHz mono FLAC with the same duration."""

from __future__ import annotations

import json

import pytest

from workers.audio.codec import AudioDecodeError, convert_for_recognizers, probe
from workers.dev.simulator.make_clips import CLIPS_DIR

CLIPS = json.loads((CLIPS_DIR / "clips.json").read_text())


@pytest.mark.parametrize("clip", CLIPS["clips"][:3], ids=lambda c: c["file"])
def test_a_served_clip_converts_once_to_16k_mono_flac(clip, tmp_path):
    original = probe(CLIPS_DIR / clip["file"])
    assert original.codec == "aac" and original.sample_rate == CLIPS["sample_rate"]
    samples = convert_for_recognizers(CLIPS_DIR / clip["file"], tmp_path / "out.flac")
    converted = probe(tmp_path / "out.flac")
    assert (converted.codec, converted.sample_rate, converted.channels) == ("flac", 16000, 1)
    assert converted.duration_sec == pytest.approx(clip["duration"], abs=0.1)
    assert len(samples) == pytest.approx(clip["duration"] * 16000, rel=0.02)
    assert abs(samples).max() > 10000, "speech survives the conversion"


def test_something_that_is_not_audio_is_refused_with_a_reason(tmp_path):
    fake = tmp_path / "page.m4a"
    fake.write_text("<html>not found</html>")
    with pytest.raises(AudioDecodeError, match="undecodable"):
        probe(fake)
