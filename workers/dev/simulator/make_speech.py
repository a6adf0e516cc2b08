"""Make the speech sets in speech/ that measure recognisers: calls read by voices made from real
speakers' recordings (Debian's flite and festival voices) as well as espeak-ng, each clean and
radio-like, plus speech.json with each clip's set, voice, condition, text and duration.

    python -m workers.dev.simulator.make_speech
    # needs espeak-ng, flite, festival (+ festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts)
    # and ffmpeg; nothing else at run time does: the clips are committed.

Radio-like: band-limited to 300-3,400 Hz (6th-order high- and low-pass), compressed (ffmpeg's
acompressor), hiss (white noise through the same band) at 20 dB below the active speech, all
encoded as the service serves calls (AAC, 32 kb/s, mono, 22.05 kHz: make_clips.encode_m4a).

Two sets, kept apart:
  * dev: the 16 phrases of clips/clips.json. Whatever is tuned (vocabulary, prompts,
    thresholds) may be tuned on these. Each is read by espeak-ng (its clean clip is the one in
    clips/) and by one real-speaker voice.
  * heldout: other phrases, never used for tuning: the figures that judge a recogniser come
    from these. Each is read by two real-speaker voices.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from workers.dev.simulator.make_clips import (
    CLIPS_DIR,
    PHRASES,
    SAMPLE_RATE,
    encode_m4a,
    pad_and_hiss,
    read_mono,
    synthesize,
)

SPEECH_DIR = Path(__file__).resolve().parent / "speech"
BAND_HZ = (300, 3400)
SNR_DB = 20.0
COMPRESSOR = "acompressor=threshold=-24dB:ratio=6:attack=5:release=80:makeup=2"

HELDOUT_PHRASES = [
    "rescue two respond to a car into a building at the shopping center",
    "engine thirty one is available in quarters",
    "medic eight we have a sixty year old male with chest pain",
    "truck six stage down the street until police clear the scene",
    "all units the fire alarm at the high school is a false alarm",
    "squad one requesting a second alarm for the warehouse on river road",
    "unit fourteen show me out at the gas station on elm street",
    "dispatch can you run a plate for me on a white truck",
    "we need traffic control at the intersection of first and maple",
    "the patient is conscious and breathing we are transporting now",
    "command to all units evacuate the building now",
    "tower ladder three is on location with smoke showing from the second floor",
    "medic two respond to a fall with a head injury at the nursing home",
    "car twenty two responding to a noise complaint on lake drive",
    "engine nine cancel your response we have it under control",
    "report of a fire in the woods near the railroad tracks behind the mall",
    "unit seven is responding to a domestic disturbance on pine street",
    "rescue one has the driver out of the vehicle",
    "we have water on the fire and a primary search is in progress",
    "dispatch we are back in service and heading back to the station",
]


def _flite(voice: str) -> Callable[[str, Path], None]:
    def speak(text: str, wav: Path) -> None:
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)

    return speak


def _festival(voice: str) -> Callable[[str, Path], None]:
    def speak(text: str, wav: Path) -> None:
        subprocess.run(
            ["text2wave", "-eval", f"(voice_{voice})", "-o", str(wav)],
            input=text.encode(),
            check=True,
        )

    return speak


# Voices made from recordings of real speakers: five people (kal and slt twice, by two engines).
REAL_VOICES: dict[str, Callable[[str, Path], None]] = {
    "flite-slt": _flite("slt"),
    "festival-kal": _festival("kal_diphone"),
    "flite-rms": _flite("rms"),
    "festival-slt-hts": _festival("cmu_us_slt_arctic_hts"),
    "flite-awb": _flite("awb"),
    "festival-ked": _festival("ked_diphone"),
    "flite-kal16": _flite("kal16"),
}


def ffmpeg_filter(samples: np.ndarray, rate: int, chain: str) -> np.ndarray:
    """SAMPLES (mono float32 at RATE) through an ffmpeg audio filter chain, out at SAMPLE_RATE."""
    pcm = ["-f", "f32le", "-ac", "1"]
    out = subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            *pcm,
            "-ar",
            str(rate),
            "-i",
            "pipe:0",
            "-af",
            chain,
            *pcm,
            "-ar",
            str(SAMPLE_RATE),
            "pipe:1",
        ],
        input=samples.astype(np.float32).tobytes(),
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, dtype=np.float32).copy()


def read_wav(wav: Path) -> tuple[np.ndarray, int]:
    """A synthesiser's WAV (any rate), as mono float32 peaking at 0.9 (the compressor's
    threshold is absolute)."""
    samples, rate = read_mono(wav)
    return samples / (np.abs(samples).max() or 1.0) * 0.9, rate


BAND = ",".join([f"highpass=f={BAND_HZ[0]}:poles=2"] * 3 + [f"lowpass=f={BAND_HZ[1]}:poles=2"] * 3)


def active_power(samples: np.ndarray) -> float:
    """Mean power over the 20 ms frames within 40 dB of the loudest: the speech, not pauses."""
    frame = SAMPLE_RATE // 50
    n = len(samples) // frame
    powers = (samples[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    return float(powers[powers >= powers.max() * 1e-4].mean())


def clean(samples: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """As the clips in clips/ are: squelch silence either side, a trace of hiss."""
    return pad_and_hiss(ffmpeg_filter(samples, rate, "anull"), rng)


def radio_like(samples: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited, compressed, hiss at SNR_DB through the same band, squelch either side."""
    speech = ffmpeg_filter(samples, rate, f"{BAND},{COMPRESSOR}")
    speech = speech / (np.abs(speech).max() or 1.0) * 0.6
    speech = pad_and_hiss(speech, rng, hiss=0.0)
    noise = ffmpeg_filter(rng.standard_normal(len(speech)).astype(np.float32), SAMPLE_RATE, BAND)
    noise = noise[: len(speech)]
    noise *= np.sqrt(active_power(speech) / 10 ** (SNR_DB / 10) / float((noise**2).mean()))
    out: np.ndarray = np.clip(speech + noise, -1, 1).astype(np.float32)
    return out


def main() -> None:
    for tool in ("espeak-ng", "flite", "text2wave", "ffmpeg"):
        if not shutil.which(tool):
            raise SystemExit(
                f"{tool} is needed to make the speech sets (Debian: apt-get install espeak-ng"
                " flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts ffmpeg)"
            )
    rng = np.random.default_rng(12)
    voices = list(REAL_VOICES)
    dev_clips = json.loads((CLIPS_DIR / "clips.json").read_text())["clips"]
    # (set, phrase number, text, voice): dev phrases by espeak-ng and one real voice each,
    # held-out phrases by two real voices each, the voices taking turns.
    readings: list[tuple[str, int, str, str]] = []
    for n, text in enumerate(PHRASES, start=1):
        readings += [("dev", n, text, "espeak-ng"), ("dev", n, text, voices[(n - 1) % 7])]
    for n, text in enumerate(HELDOUT_PHRASES, start=1):
        readings += [("heldout", n, text, voices[(2 * n - 2) % 7])]
        readings += [("heldout", n, text, voices[(2 * n - 1) % 7])]
    if SPEECH_DIR.exists():
        shutil.rmtree(SPEECH_DIR)
    SPEECH_DIR.mkdir()
    index = []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, n, text, voice in readings:
            wav = Path(tmp) / "speech.wav"
            if voice == "espeak-ng":
                synthesize(text, wav, speed=150)
            else:
                REAL_VOICES[voice](text, wav)
            samples, rate = read_wav(wav)
            for condition in ("clean", "radio"):
                reading = {"set": set_name, "phrase": n, "voice": voice, "condition": condition}
                if condition == "clean" and voice == "espeak-ng":
                    clip = dev_clips[n - 1]  # the committed clip in clips/ is this reading
                    assert clip["text"] == text, "clips/clips.json does not match PHRASES"
                    file, duration = f"../clips/{clip['file']}", clip["duration"]
                else:
                    make = clean if condition == "clean" else radio_like
                    out = make(samples, rate, rng)
                    file = f"{set_name}{n:02d}-{voice}-{condition}.m4a"
                    encode_m4a(out, SPEECH_DIR / file)
                    duration = round(len(out) / SAMPLE_RATE, 3)
                index.append({"file": file, **reading, "text": text, "duration": duration})
    (SPEECH_DIR / "speech.json").write_text(
        json.dumps(
            {
                "sample_rate": SAMPLE_RATE,
                "radio": {
                    "band_hz": list(BAND_HZ),
                    "snr_db": SNR_DB,
                    "compressor": COMPRESSOR,
                    "codec": "AAC 32 kb/s mono",
                },
                "clips": index,
            },
            indent=1,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in SPEECH_DIR.glob("*.m4a"))
    print(f"wrote {len(index)} entries ({size / 1e6:.2f} MB of new clips) to {SPEECH_DIR}")


if __name__ == "__main__":
    main()
