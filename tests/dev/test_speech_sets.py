"""The speech sets that judge recognisers (workers/dev/simulator/speech) are what the README says:
every clean reading has a radio-like twin that is band-limited, hissy at about 20 dB and AAC at
32 kb/s as the service serves calls; real speakers' voices; a held-out set apart from the dev
phrases."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from workers.audio.codec import decode_mono, probe
from workers.dev.simulator.make_clips import PHRASES, SQUELCH_SEC
from workers.dev.simulator.make_speech import SPEECH_DIR

INDEX = json.loads((SPEECH_DIR / "speech.json").read_text())
CLIPS = INDEX["clips"]
RADIO = [c for c in CLIPS if c["condition"] == "radio"]
RATE = 16000


def test_every_reading_is_there_clean_and_radio_like():
    readings = Counter((c["set"], c["phrase"], c["voice"]) for c in CLIPS)
    assert set(readings.values()) == {2}
    assert {c["condition"] for c in CLIPS} == {"clean", "radio"}
    assert all((SPEECH_DIR / c["file"]).is_file() for c in CLIPS)
    voices = {c["voice"].split("-")[0] for c in CLIPS}
    assert voices == {"espeak", "flite", "festival"}


def test_the_held_out_set_is_apart_from_the_dev_phrases():
    dev = {c["text"] for c in CLIPS if c["set"] == "dev"}
    heldout = {c["text"] for c in CLIPS if c["set"] == "heldout"}
    assert dev == set(PHRASES)
    assert len(heldout) == 20 and not heldout & dev
    assert all(c["voice"] != "espeak-ng" for c in CLIPS if c["set"] == "heldout")


@pytest.mark.parametrize("clip", RADIO[::8], ids=lambda c: c["file"])
def test_a_radio_like_clip_is_narrow_band_hissy_aac_at_32_kbps(clip):
    path = SPEECH_DIR / clip["file"]
    info = probe(path)
    assert (info.codec, info.channels) == ("aac", 1)
    assert info.duration_sec == pytest.approx(clip["duration"], abs=0.1)
    kbps = path.stat().st_size * 8 / info.duration_sec / 1000
    assert 28 < kbps < 36
    x = decode_mono(path).astype(np.float64) / 32768
    power = np.abs(np.fft.rfft(x)) ** 2
    freq = np.fft.rfftfreq(len(x), 1 / RATE)
    # The band's edges slope (6th order): an octave below 300 Hz, and above 4.5 kHz, almost nothing.
    outside = power[(freq < 150) | (freq > 4500)].sum() / power.sum()
    assert outside < 0.005
    frame = RATE // 50
    frames = (x[: len(x) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1)
    hiss = (x[int(0.05 * RATE) : int((SQUELCH_SEC - 0.05) * RATE)] ** 2).mean()
    assert hiss > 0, "hiss before the speech, as the channel opens"
    snr_db = 10 * np.log10(np.sort(frames)[len(frames) // 2 :].mean() / hiss)
    assert 17 < snr_db < 25
