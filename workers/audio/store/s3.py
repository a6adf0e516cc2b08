"""The object store: AUDIO_STORE_URL=s3://bucket/prefix on AWS S3 or an S3-compatible server
(MinIO, SeaweedFS, Garage, Ceph, R2), through obstore (Rust's object_store).

Why obstore: its calls are awaitables on the process's asyncio loop; it uploads from a file in
parts (multipart above MULTIPART_CHUNK, MULTIPART_CONCURRENCY parts at once), streams
gets, retries with backoff, signs URLs and speaks path-style, in one small wheel. aiobotocore
would bring botocore (~100 MB) and leave multipart and its clean-up to us.

obstore runs a tokio runtime, started on first use: the client is made lazily, in the process
that uses it (never a Celery parent before its fork), and again after a fork (checked by pid).
A process that exits right after an async obstore call sometimes aborts (SIGABRT: the runtime's
thread finishing the call meets the interpreter's shutdown): pool processes leave by os._exit,
the start-up check's child too, and links are signed with the synchronous call.

Atomicity: a PUT, or a multipart upload's completion, makes the object visible whole; before
that readers see the previous version or nothing. Errors are re-raised as StoreError with a
short message (obstore's carry the request URL and the server's XML, never a presigned query
string, since requests are signed in headers); the secret key is scrubbed from them anyway.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import mimetypes
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import obstore

from workers.audio.store import (
    StoreConfigError,
    StoredAudioMismatch,
    StoredAudioMissing,
    StoreError,
    WorkDir,
    is_valid_key,
    work_dir,
)
from workers.core.settings import AudioSettings, ServiceSettings, split_store_url

if TYPE_CHECKING:
    from obstore.store import S3Credential, S3CredentialProvider, S3Store

# Objects larger than this are uploaded in parts of this size, this many parts at once: what an
# upload holds grows far slower than the file (bench/store.py measures it: about 23 MB for a
# 25 MB file; 4 at once took some 5 MB more, for no gain on calls, mostly under one part).
MULTIPART_CHUNK = 5 * 1024 * 1024  # S3's smallest part
MULTIPART_CONCURRENCY = 2
READ_CHUNK = 1024 * 1024
CHECK_KEY = ".bcfy-store-check"
FETCHED_DIR = "fetched"
# A fetched copy untouched this long has no reader: one call's recognition ends within
# TRANSCRIBE_TIME_LIMIT_SEC, below the broker's visibility timeout (an hour by default). Copies a
# killed process left are removed by the next fetch on the host.
FETCHED_STALE_SEC = 6 * 3600.0
# The server's answer to a request it refused for its credentials or permissions.
REFUSED_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidClientTokenId",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
CREDENTIALS = "AUDIO_S3_ACCESS_KEY_ID / AUDIO_S3_SECRET_ACCESS_KEY"


def static_credentials(audio: AudioSettings) -> S3CredentialProvider | None:
    """AUDIO_S3_ACCESS_KEY_ID / AUDIO_S3_SECRET_ACCESS_KEY as obstore's credential provider,
    None when they are empty. Given as config instead, the keys would be sent with whatever
    AWS_SESSION_TOKEN the environment holds (obstore reads AWS_* beneath its config, and an
    empty session_token is sent as an empty token): a stray token of another account would
    break every signature, or go to an endpoint it was never meant for."""
    if not audio.s3_access_key_id:
        return None
    credential: S3Credential = {
        "access_key_id": audio.s3_access_key_id,
        "secret_access_key": audio.s3_secret_access_key.reveal(),
        "token": None,
        "expires_at": None,  # static: obstore asks once
    }
    return lambda: credential


class S3AudioStore:
    """AudioStore on an S3 bucket (under a prefix)."""

    def __init__(self, audio: AudioSettings, services: ServiceSettings) -> None:
        self.audio = audio
        self.services = services
        self.bucket, self.prefix = split_store_url(audio.store_url)
        self.work = WorkDir(work_dir(audio))
        # Copies fetched for reading, apart: the audio pool's sweep of old temporary files
        # (its work directory may be this one) must not take a copy being recognised.
        self.fetched = WorkDir(self.work.path / FETCHED_DIR)
        self._client: S3Store | None = None
        self._client_pid = 0

    # --- the client ---------------------------------------------------------------------

    def client(self) -> S3Store:
        """obstore's S3 store, made in this process on first use."""
        if self._client is None or self._client_pid != os.getpid():
            from obstore.store import S3Store

            a, s = self.audio, self.services
            path_style = a.s3_path_style == "true" or (
                a.s3_path_style == "auto" and bool(a.s3_endpoint)
            )
            config: dict[str, str | bool] = {
                "region": a.s3_region,
                "virtual_hosted_style_request": not path_style,
            }
            if a.s3_endpoint:
                config["endpoint"] = a.s3_endpoint
            # obstore also reads the AWS_* variables for what this leaves open (the README says
            # so): credentials from the environment or the instance's role when these are empty.
            self._client = S3Store(
                self.bucket,
                config=config,  # type: ignore[arg-type]
                credential_provider=static_credentials(a),
                client_options={
                    "allow_http": a.s3_endpoint.startswith("http://"),
                    "connect_timeout": timedelta(seconds=s.http_connect_timeout_sec),
                    # One request (a part, a get's whole body); a large get streams within it.
                    "timeout": timedelta(seconds=s.http_total_timeout_sec),
                },
                retry_config={
                    # Connection errors, timeouts, 5xx and 429 are retried; 4xx are not.
                    "max_retries": 5,
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=5),
                        "base": 2,
                    },
                    "retry_timeout": timedelta(seconds=s.http_total_timeout_sec),
                },
            )
            self._client_pid = os.getpid()
        return self._client

    def path(self, key: str) -> str:
        """The object's name in the bucket (the prefix is ours, not obstore's, so that links
        and deletes see the same names)."""
        if not is_valid_key(key):
            raise ValueError(f"{key!r} is not a key of the audio store")
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- the interface ------------------------------------------------------------------

    async def check(self, write: bool = False) -> None:
        """Read a key that is not there (NoSuchKey: the bucket exists and the credentials
        work; this needs only read permission); with `write`, also store and delete one."""
        try:
            await obstore.get_async(self.client(), self.path(CHECK_KEY))
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                self._raise(exc, "checking the bucket")
        except Exception as exc:
            self._raise(exc, "checking the bucket")
        if write:
            try:
                await obstore.put_async(self.client(), self.path(CHECK_KEY), b"")
                await obstore.delete_async(self.client(), self.path(CHECK_KEY))
            except Exception as exc:
                self._raise(exc, "writing to the bucket")

    async def promote(self, files: Sequence[tuple[Path, str]]) -> None:
        """Upload each file (multipart when large), each visible whole or not at all; the
        uploads run at once, and one failing cancels the others."""
        try:
            async with asyncio.TaskGroup() as uploads:
                for temp, key in files:
                    uploads.create_task(self._upload(temp, key))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def _upload(self, temp: Path, key: str) -> None:
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        try:
            await obstore.put_async(
                self.client(),
                self.path(key),
                temp,
                attributes={"Content-Type": content_type},
                chunk_size=MULTIPART_CHUNK,
                max_concurrency=MULTIPART_CONCURRENCY,
            )
        except Exception as exc:
            self._raise(exc, f"storing {key}")

    async def fetch(self, key: str, sha256: str | None, call_id: int) -> Path:
        """Stream the object into a local temporary file, hashing as it comes; a copy whose
        sha256 differs from the recorded one is removed and refused."""
        self.fetched.discard_temps(call_id)  # what an earlier, killed reader left
        self.fetched.sweep_temps(FETCHED_STALE_SEC)  # and what killed readers of others left
        dest = self.fetched.temp_file(call_id, "fetched")
        try:
            digest = hashlib.sha256()
            try:
                got = await obstore.get_async(self.client(), self.path(key))
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(None, dest.open, "wb")
                try:
                    async for chunk in got.stream(min_chunk_size=READ_CHUNK):
                        digest.update(chunk)
                        await loop.run_in_executor(None, out.write, chunk)
                finally:
                    out.close()
            except FileNotFoundError as exc:
                if "NoSuchBucket" in str(exc):
                    self._raise(exc, f"reading {key}")
                raise StoredAudioMissing(
                    2, "no such object", f"s3://{self.bucket}/{self.path(key)}"
                ) from None
            except Exception as exc:
                self._raise(exc, f"reading {key}")
            if sha256 and digest.hexdigest() != sha256:
                raise StoredAudioMismatch(
                    f"s3://{self.bucket}/{self.path(key)}: its sha256 is {digest.hexdigest()}, "
                    f"not the {sha256} recorded when it was stored"
                )
        except BaseException:
            self.fetched.discard(dest)
            raise
        return dest

    def release(self, path: Path) -> None:
        self.fetched.discard(path)

    async def delete(self, keys: Sequence[str]) -> int:
        """One bulk request per 1000 keys; missing objects are fine (S3 cannot tell them)."""
        paths = [self.path(key) for key in keys]
        for start in range(0, len(paths), 1000):
            try:
                await obstore.delete_async(self.client(), paths[start : start + 1000])
            except Exception as exc:
                self._raise(exc, f"deleting {len(paths)} objects")
        return len(paths)

    async def link(self, key: str) -> str:
        """A presigned GET URL, valid AUDIO_S3_LINK_TTL_SEC (never logged: it is a
        credential for the object while it lasts)."""
        # obstore's synchronous sign, in an executor: signing is local computation, and a
        # process that exits right after one of obstore's *async* calls sometimes aborts
        # (SIGABRT: a runtime thread still finishing the call meets the interpreter's shutdown;
        # 4 in 60 runs here), which `bcfy search` would do.
        sign = functools.partial(
            obstore.sign,
            self.client(),
            "GET",
            self.path(key),
            timedelta(seconds=self.audio.s3_link_ttl_sec),
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(None, sign)
        except Exception as exc:
            self._raise(exc, f"signing a link to {key}")

    # --- errors -------------------------------------------------------------------------

    def _raise(self, exc: BaseException, doing: str) -> NoReturn:
        raise self.failure(exc, doing) from None

    def failure(self, exc: BaseException, doing: str) -> StoreError:
        """A short, secret-free StoreError; StoreConfigError naming the setting when the
        bucket is missing or the credentials are refused."""
        text = str(exc)
        code_match = re.search(r"<Code>([A-Za-z]+)</Code>", text)
        code = code_match.group(1) if code_match else ""
        status_match = re.search(r"status code: (\d{3})", text)
        status = int(status_match.group(1)) if status_match else 0
        where = self.audio.s3_endpoint or "AWS S3"
        if code == "NoSuchBucket":
            return StoreConfigError(
                f"AUDIO_STORE_URL={self.audio.store_url}: the bucket {self.bucket!r} does not "
                f"exist at {where}"
            )
        if code in REFUSED_CODES or status in (401, 403):
            return StoreConfigError(
                f"{CREDENTIALS}: {where} refused them ({code or status}) while {doing} "
                f"(bucket {self.bucket!r})"
            )
        return StoreError(f"{doing} (s3://{self.bucket}): {self.scrub(_summary(text))}")

    def scrub(self, text: str) -> str:
        secret = self.audio.s3_secret_access_key.reveal()
        return text.replace(secret, "***") if secret else text


def _summary(text: str) -> str:
    """obstore's message without its debug dump and the server's XML body."""
    text = text.split("\n\nDebug source:", 1)[0]
    text = re.sub(r"<\?xml.*", "", text, flags=re.DOTALL)
    return re.sub(r"[?][^ ]*", "", text).strip()[:500]
