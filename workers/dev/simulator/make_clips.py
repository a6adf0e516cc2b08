"""Make the spoken test calls in clips/: radio-style phrases read by espeak-ng, encoded to AAC
in .m4a (as the service serves them), plus clips.json with each clip's text and duration.

    python -m workers.dev.simulator.make_clips      # needs espeak-ng; nothing else at run time does

The clips are committed, so tests, the simulator and demo mode need no speech synthesiser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np

CLIPS_DIR = Path(__file__).resolve().parent / "clips"
SAMPLE_RATE = 22050  # the service's AAC is typically mono at 22.05 kHz or less
SQUELCH_SEC = 0.35  # silence before and after, as a radio's squelch leaves it

PHRASES = [
    "engine twelve respond to a structure fire at four hundred main street",
    "medic three is en route to the hospital with one patient",
    "unit five is on scene and requesting backup",
    "all units be advised the suspect vehicle is a blue sedan heading north",
    "dispatch show me available and returning to the station",
    "ladder seven respond for smoke in the building on oak avenue",
    "caller reports a traffic accident with injuries on the highway",
    "copy that we are clearing the scene now",
    "requesting an ambulance to the corner of fifth and park",
    "police and fire respond to a gas leak at the school",
    "battalion chief command is established this is a working fire",
    "we have one patient with a broken leg at the park",
    "engine four is returning to quarters",
    "the fire is under control and crews are checking for extension",
    "unit nine traffic stop on a red truck at the bridge",
    "medical emergency at the library for a person not breathing",
]


def synthesize(text: str, wav: Path, speed: int) -> None:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(speed), "-w", str(wav), text], check=True)


def read_mono(wav: Path) -> tuple[np.ndarray, int]:
    with av.open(str(wav)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        return np.concatenate(frames).astype(np.float32), stream.rate


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return samples
    positions = np.arange(0, len(samples), rate / target)
    resampled: np.ndarray = np.interp(positions, np.arange(len(samples)), samples)
    return resampled.astype(np.float32)


def pad_and_hiss(samples: np.ndarray, rng: np.random.Generator, hiss: float = 0.004) -> np.ndarray:
    """Pad with squelch silence and add a little hiss, so it sounds (and decodes) like a call."""
    pad = np.zeros(int(SQUELCH_SEC * SAMPLE_RATE), dtype=np.float32)
    speech = samples / (np.abs(samples).max() or 1.0) * 0.7
    out = np.concatenate([pad, speech, pad])
    noise = rng.normal(0, hiss, len(out)).astype(np.float32) if hiss else 0.0
    clipped: np.ndarray = np.clip(out + noise, -1, 1).astype(np.float32)
    return clipped


def encode_m4a(samples: np.ndarray, path: Path) -> None:
    pcm = (samples * 32767).astype(np.int16)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        stream.bit_rate = 32000
        frame_size = 1024
        for start in range(0, len(pcm), frame_size):
            chunk = pcm[start : start + frame_size].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def main() -> None:
    if not shutil.which("espeak-ng"):
        raise SystemExit(
            "espeak-ng is needed to make the clips (Debian: apt-get install espeak-ng)"
        )
    rng = np.random.default_rng(1)
    CLIPS_DIR.mkdir(exist_ok=True)
    index = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, text in enumerate(PHRASES, start=1):
            wav = Path(tmp) / f"{n}.wav"
            synthesize(text, wav, speed=150)
            samples, rate = read_mono(wav)
            samples = pad_and_hiss(resample(samples, rate, SAMPLE_RATE), rng)
            name = f"call{n:02d}.m4a"
            encode_m4a(samples, CLIPS_DIR / name)
            index.append(
                {"file": name, "text": text, "duration": round(len(samples) / SAMPLE_RATE, 3)}
            )
        silence = rng.normal(0, 0.0005, SAMPLE_RATE * 3).astype(np.float32)
        encode_m4a(silence, CLIPS_DIR / "silence.m4a")
    (CLIPS_DIR / "clips.json").write_text(
        json.dumps(
            {
                "sample_rate": SAMPLE_RATE,
                "clips": index,
                "silence": {"file": "silence.m4a", "duration": 3.0},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {len(index)} clips and silence.m4a to {CLIPS_DIR}")


if __name__ == "__main__":
    main()
