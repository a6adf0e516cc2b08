"""What the README's audio section promises, each shown so that it fails when the promise breaks:

- the download deadline (HTTP_TOTAL_TIMEOUT_SEC): a server that trickles bytes forever (so no
  read timeout ever fires) does not hold a download past it; the attempt ends as `timeout`;
- the request goes to the checked address with the Host header and the TLS server name (SNI,
  and so the certificate check) of the host name: an HTTPS server with a self-signed
  certificate for a made-up name, reached through the resolver hook;
- AUDIO_DURATION_TOLERANCE and AUDIO_SILENCE_DBFS at their limits, with clips made here;
- the prepared file is 16-bit, 16 kHz, mono.
"""

from __future__ import annotations

import asyncio
import io
import math
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tasks.audio.preparation import CallPreparer
from tests.conftest import Services
from tests.support.audio import attempt_rows, audio_rows, claim
from workers.audio.download import AudioFailure, UrlPolicy, download
from workers.audio.prepare import PreparedAudio, validate_and_convert
from workers.audio.store.filesystem import FilesystemAudioStore
from workers.core.runtime import Runtime
from workers.core.settings import Settings, get_settings
from workers.dev.calls import insert_call

RATE = 16000
WINDOW = RATE // 10  # the 100 ms the silence check looks at
TONE_HZ = 500  # 32 samples a period at 16 kHz: a whole number of periods per window

# --- clips made here -------------------------------------------------------------------------


def tone(seconds: float, dbfs: float, rate: int = RATE) -> np.ndarray:
    """A 500 Hz sine whose RMS is `dbfs` (dB full scale), as float in [-1, 1]."""
    n = round(seconds * rate)
    amplitude = math.sqrt(2) * 10 ** (dbfs / 20)
    return amplitude * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / rate)


def to_int16(signal: np.ndarray) -> np.ndarray:
    return np.clip(np.round(signal * 32768), -32768, 32767).astype(np.int16)


def burst_in_silence(level_dbfs: float) -> np.ndarray:
    """One second: silence, 200 ms of tone at `level_dbfs` on window boundaries, silence."""
    samples = np.zeros(RATE, dtype=np.int16)
    samples[WINDOW : 3 * WINDOW] = to_int16(tone(0.2, level_dbfs))
    return samples


def dbfs_of(samples: np.ndarray) -> float:
    """RMS level in dB full scale, computed here from the samples (not by the pipeline)."""
    rms = math.sqrt(float(np.mean(samples.astype(np.float64) ** 2)))
    return 20 * math.log10(rms / 32768)


def wav(samples: np.ndarray, rate: int = RATE, layout: str = "mono") -> bytes:
    """A WAV file: int16 samples as pcm_s16le, float ones (interleaved) as pcm_f32le."""
    int16 = samples.dtype == np.int16
    fmt = "s16" if int16 else "flt"
    out = io.BytesIO()
    with av.open(out, "w", format="wav") as container:
        # (the codec named in the call: av's types tell an audio stream by the literal)
        stream = container.add_stream(
            "pcm_s16le" if int16 else "pcm_f32le", rate=rate, layout=layout
        )
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples).reshape(1, -1), format=fmt, layout=layout
        )
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def prepared_format(path: Path) -> tuple[str, str, int, int]:
    """(codec, sample format, rate, channels) of a file, as a decoder sees it."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        frame = next(container.decode(stream))
        return ctx.name, frame.format.name, frame.sample_rate, len(frame.layout.channels)


def flac_streaminfo(path: Path) -> tuple[int, int, int]:
    """(sample rate, channels, bits per sample) from a FLAC file's STREAMINFO block, read from
    its bytes (no decoder involved)."""
    data = path.read_bytes()[:42]
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO comes first"
    info = int.from_bytes(data[8 + 10 : 8 + 18], "big")  # rate 20, channels 3, bits 5, ...
    rate, channels, bits = info >> 44, (info >> 41) & 0x7, (info >> 36) & 0x1F
    return rate, channels + 1, bits + 1


# --- a local audio server --------------------------------------------------------------------


class AudioServer:
    """An HTTP(S) server on 127.0.0.1 serving `clips` by path; `/trickle` sends one byte every
    `trickle_every` seconds of a body announced as 10 MB, until the client hangs up (or a
    minute has passed). Records each request's Host header and, over TLS, the SNI."""

    def __init__(self, tls: ssl.SSLContext | None = None, trickle_every: float = 0.1) -> None:
        self.clips: dict[str, bytes] = {}
        self.hosts: list[str | None] = []
        self.sni: list[str | None] = []
        self.trickled = 0
        self.client_hung_up = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.hosts.append(self.headers.get("Host"))
                if self.path == "/trickle":
                    server.trickle(self, trickle_every)
                    return
                body = server.clips.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def trickle(self, handler: BaseHTTPRequestHandler, every: float) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(10_000_000))
        handler.end_headers()
        until = time.monotonic() + 60
        try:
            while time.monotonic() < until:
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                self.trickled += 1
                time.sleep(every)
        except OSError:
            self.client_hung_up.set()

    def __enter__(self) -> AudioServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[AudioServer]:
    with AudioServer() as s:
        yield s


# --- running the audio stage in-process ------------------------------------------------------


def settings_for(server: AudioServer, tmp_path: Path, **overrides: Any) -> Settings:
    return get_settings().with_values(
        AUDIO_STORE_DIR=str(tmp_path / "store"),
        AUDIO_ALLOWED_HOSTS=(server.host,),
        AUDIO_ALLOWED_INTERNAL_NETWORKS=("127.0.0.1/32",),
        **overrides,
    )


def prepare_due_calls(services: Services, s: Settings, owner: str = "test-claim") -> Any:
    claimed = asyncio.run(claim(services, s, owner))
    rt = Runtime.current()
    return rt.run(CallPreparer(s, rt.http, owner, "test:1").run(claimed.call_ids))


# --- the download deadline -------------------------------------------------------------------


def test_a_server_trickling_forever_is_cut_at_the_download_deadline(db, clean, server, tmp_path):
    # Bytes keep coming (one every 0.1 s), so no read timeout (20 s) ever fires: only the
    # deadline of the whole download ends it.
    s = settings_for(
        server,
        tmp_path,
        HTTP_TOTAL_TIMEOUT_SEC=1.5,
        AUDIO_MAX_ATTEMPTS=2,
        AUDIO_RETRY_BASE_SEC=0,
    )
    assert s.services.http_read_timeout_sec > s.services.http_total_timeout_sec * 10
    call = insert_call(db, f"http://{server.host}/trickle", 3.0)

    first = prepare_due_calls(clean, s)
    assert (first.retry, first.ready, first.failed) == (1, 0, 0)
    row = audio_rows(db)[call]
    assert (row["state"], row["error_code"]) == ("pending", "timeout"), row["last_error"]
    assert "took longer than 1.5s" in row["last_error"]
    assert server.client_hung_up.wait(30), "the downloader let go of the connection"
    assert server.trickled >= 1, "the server was sending when the deadline cut it"

    second = prepare_due_calls(clean, s, owner="test-claim-2")
    assert (second.retry, second.ready, second.failed) == (0, 0, 1)
    row = audio_rows(db)[call]
    assert (row["state"], row["error_code"], row["attempts"]) == ("failed", "timeout", 2)
    assert attempt_rows(db, call) == [(1, "retry", "timeout"), (2, "failed", "timeout")]
    assert FilesystemAudioStore(s.audio.store_dir).work.temp_files() == []


# --- Host header and TLS server name ---------------------------------------------------------

NAME = "audio.bcfy-promise.test"  # made up; resolved only by the test's resolver


@pytest.fixture(scope="module")
def certificate() -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate (its own CA) for NAME, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("SKIPPED LOUDLY: no openssl command to make a test certificate")
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={NAME}",
             "-addext", f"subjectAltName=DNS:{NAME}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        yield cert, key


def fetch_over_https(url: str, cafile: Path, tmp_path: Path, policy: UrlPolicy) -> Any:
    """download() of `url` to tmp_path/"a", through a client that trusts only `cafile`."""

    async def fetch() -> Any:
        trusted = ssl.create_default_context(cafile=str(cafile))
        async with httpx.AsyncClient(verify=trusted, timeout=10) as client:
            return await download(
                client,
                url,
                tmp_path / "a",
                policy,
                max_bytes=1_000_000,
                max_redirects=0,
                timeout_sec=30,
            )

    return asyncio.run(fetch())


def test_https_goes_to_the_checked_address_with_the_names_host_and_sni(certificate, tmp_path):
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    resolved: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        resolved.append((host, port))
        return ["127.0.0.1"]

    clip = wav(to_int16(tone(1.0, -20)))
    with AudioServer(tls=tls) as server:
        server.clips["/call.wav"] = clip
        policy = UrlPolicy((f"{NAME}:{server.port}",), ("127.0.0.1/32",), resolver)
        got = fetch_over_https(f"https://{NAME}:{server.port}/call.wav", cert, tmp_path, policy)
    assert (tmp_path / "a").read_bytes() == clip and got.size == len(clip)
    assert resolved == [(NAME, server.port)], "the name was resolved once, by the checked hook"
    assert server.sni == [NAME], "the TLS server name is the host name, not the address"
    assert server.hosts == [f"{NAME}:{server.port}"], "the Host header is the host name"


def test_https_with_a_certificate_for_another_name_is_refused(certificate, tmp_path):
    # The certificate is checked against the name: the same server reached as another allowed
    # name (resolving to the same address) fails its TLS check.
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    with AudioServer(tls=tls) as server:
        server.clips["/call.wav"] = wav(to_int16(tone(1.0, -20)))
        other = "other.bcfy-promise.test"
        policy = UrlPolicy((f"{other}:{server.port}",), ("127.0.0.1/32",), resolver)
        with pytest.raises(AudioFailure) as err:
            fetch_over_https(f"https://{other}:{server.port}/call.wav", cert, tmp_path, policy)
    assert err.value.code == "network" and "certificate" in err.value.detail.lower()
    assert server.sni == [other] and server.hosts == []


# --- the duration tolerance and the silence threshold at their limits ------------------------

MARGIN = 0.003  # relative duration either side of the tolerance; 48 samples at 1 s
PREPARED = "a.flac"


def prepare_samples(
    samples: np.ndarray, workdir: Path, api_duration: float, tolerance: float, silence_dbfs: float
) -> PreparedAudio:
    """validate_and_convert of `samples`, written as a WAV in workdir, into workdir/PREPARED."""
    original = workdir / "a.wav"
    original.write_bytes(wav(samples))
    return validate_and_convert(
        original,
        workdir / PREPARED,
        expected_duration=api_duration,
        tolerance=tolerance,
        silence_dbfs=silence_dbfs,
        max_duration_sec=3600,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    api_duration=st.floats(min_value=0.5, max_value=4.0),
    tolerance=st.floats(min_value=0.02, max_value=0.6),
    longer=st.booleans(),
    over=st.booleans(),
)
def test_a_clip_just_inside_the_duration_tolerance_passes_and_just_outside_fails(
    api_duration: float, tolerance: float, longer: bool, over: bool
) -> None:
    relative = tolerance + (MARGIN if over else -MARGIN)
    measured = api_duration * (1 + relative if longer else 1 - relative)
    samples = to_int16(tone(measured, -20))
    off = abs(len(samples) / RATE - api_duration) / api_duration
    assume(abs(off - tolerance) > MARGIN / 2)  # sample rounding kept it on its side
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepared = prepare_samples(samples, Path(tmp), api_duration, tolerance, -50)
        except AudioFailure as failure:
            assert over, f"{off:.4f} off is within {tolerance:.4f}, yet refused: {failure}"
            assert failure.code == "duration_mismatch"
            assert f"the API says {api_duration:.2f}s" in failure.detail
            flac = Path(tmp) / PREPARED
            assert not flac.exists() or flac.stat().st_size == 0
        else:
            assert not over, f"{off:.4f} off is past {tolerance:.4f}, yet accepted"
            assert prepared.duration_sec == pytest.approx(len(samples) / RATE, abs=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(threshold=st.floats(min_value=-70, max_value=-8), louder=st.booleans())
def test_a_clip_just_above_the_silence_threshold_passes_and_just_below_fails(
    threshold: float, louder: bool
) -> None:
    samples = burst_in_silence(threshold + (0.3 if louder else -0.3))
    level = dbfs_of(samples[WINDOW : 2 * WINDOW])  # the loudest 100 ms, by our own count
    assume(abs(level - threshold) > 0.1)
    assert (level > threshold) == louder
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepared = prepare_samples(samples, Path(tmp), 1.0, 0.15, threshold)
        except AudioFailure as failure:
            assert not louder, f"{level:.2f} dBFS is above {threshold:.2f}, yet refused"
            assert failure.code == "silence" and "silent from end to end" in failure.detail
        else:
            assert louder, f"{level:.2f} dBFS is below {threshold:.2f}, yet accepted"
            assert prepared.loudest_dbfs == pytest.approx(level, abs=0.05)


def test_the_settings_decide_at_their_limits_and_the_prepared_file_is_s16_16k_mono(
    db, clean, server, tmp_path
):
    """Through the audio stage, with AUDIO_DURATION_TOLERANCE=0.2 and AUDIO_SILENCE_DBFS=-40
    (both far from their defaults): each clip on either side of each limit, one of them a
    44.1 kHz stereo float WAV, so the conversion has work to do."""
    s = settings_for(server, tmp_path, AUDIO_DURATION_TOLERANCE=0.2, AUDIO_SILENCE_DBFS=-40.0)
    stereo = np.repeat(tone(2.0, -20, rate=44100).astype(np.float32), 2)  # L, R interleaved
    clips = {
        # path: (file, API duration, expected outcome)
        "/in.wav": (wav(to_int16(tone(2.38, -20))), 2.0, "ready"),  # 19 % long
        "/out.wav": (wav(to_int16(tone(2.42, -20))), 2.0, "duration_mismatch"),  # 21 % long
        "/short-in.wav": (wav(to_int16(tone(1.62, -20))), 2.0, "ready"),  # 19 % short
        "/short-out.wav": (wav(to_int16(tone(1.58, -20))), 2.0, "duration_mismatch"),
        "/loud.wav": (wav(burst_in_silence(-39.5)), 1.0, "ready"),
        "/quiet.wav": (wav(burst_in_silence(-40.5)), 1.0, "silence"),
        "/stereo.wav": (wav(stereo, rate=44100, layout="stereo"), 2.0, "ready"),
    }
    calls = {}
    for path, (body, duration, expected) in clips.items():
        server.clips[path] = body
        calls[insert_call(db, f"http://{server.host}{path}", duration)] = (path, expected)

    prepare_due_calls(clean, s)
    rows = audio_rows(db)
    outcomes = {
        path: rows[call]["state"] if rows[call]["state"] == "ready" else rows[call]["error_code"]
        for call, (path, _) in calls.items()
    }
    assert outcomes == {path: expected for path, (_, _, expected) in clips.items()}

    store = FilesystemAudioStore(s.audio.store_dir)
    for call, (path, expected) in calls.items():
        if expected != "ready":
            continue
        prepared = store.local_path(rows[call]["prepared_path"])
        assert prepared_format(prepared) == ("flac", "s16", 16000, 1), path
        assert flac_streaminfo(prepared) == (16000, 1, 16), path
