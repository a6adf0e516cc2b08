"""Where call audio lives: one interface (AudioStore), two backends, one factory (store_for).

  filesystem.py  AUDIO_STORE_DIR (default): files renamed into place under a local directory
  s3.py          AUDIO_STORE_URL=s3://bucket/prefix: an S3-compatible object store (obstore)

Keys, relative to the store's root or prefix (what call_audio records):

    <playlist uuid>/<YYYY-MM-DD of the call's start, UTC>/<call id>.<ext>       the original
    <playlist uuid>/<YYYY-MM-DD>/<call id>.16k.flac                             for recognisers

Work in progress is always local (WorkDir, AUDIO_WORK_DIR): downloads and conversions are
written to temporary files there, then `promote` makes them durable under their keys, whole or
not at all (a rename, or an S3 PUT / completed multipart upload: a reader never sees half an
object). Reading (`fetch`) gives a local file whose sha256 was checked against the recorded
one; `release` gives it back. Operations that touch the store are async, on the process's loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Protocol
from uuid import UUID

from workers.core.settings import AudioSettings, ServiceSettings, Settings

PREPARED_SUFFIX = ".16k.flac"
FILESYSTEM_TEMP_DIR = ".tmp"  # under AUDIO_STORE_DIR: the same filesystem, renames are atomic


class StoreError(Exception):
    """The store refused or failed an operation (the message never holds a secret)."""


class StoreConfigError(StoreError):
    """The store's settings are wrong: the message names the variable to fix."""


class StoredAudioMismatch(StoreError):
    """A stored object's bytes differ from the sha256 recorded when it was stored."""


class StoredAudioMissing(FileNotFoundError):
    """No object under a key the database records."""


class AudioStore(Protocol):
    work: WorkDir

    async def check(self, write: bool = False) -> None:
        """Start-up check: the store can be read (and written, with `write`); a
        StoreConfigError names the setting to fix."""
        ...

    async def promote(self, files: Sequence[tuple[Path, str]]) -> None:
        """Store each local temporary file under its key, each whole or not at all."""
        ...

    async def fetch(self, key: str, sha256: str | None, call_id: int) -> Path:
        """A local file holding the object, its sha256 checked (StoredAudioMismatch,
        StoredAudioMissing); give it back with `release`."""
        ...

    def release(self, path: Path) -> None:
        """Done reading a file `fetch` gave (a fetched copy is removed)."""
        ...

    async def delete(self, keys: Sequence[str]) -> int:
        """Remove these objects (missing ones are fine); how many were removed, or asked to
        be where the store cannot tell."""
        ...

    async def link(self, key: str) -> str:
        """Where a person can get the object: a path, or a time-limited URL."""
        ...


def call_keys(
    call_id: int, playlist_uuid: UUID | None, started_at: datetime, extension: str
) -> tuple[str, str]:
    """(original key, prepared key) of one call: playlist / date / call."""
    playlist = str(playlist_uuid) if playlist_uuid else "no-playlist"
    day = started_at.strftime("%Y-%m-%d")
    base = PurePosixPath(playlist, day)
    return str(base / f"{call_id}.{extension}"), str(base / f"{call_id}{PREPARED_SUFFIX}")


def is_valid_key(key: str) -> bool:
    """A relative key with no empty, '.' or '..' part: it cannot leave the store's root or
    prefix."""
    parts = key.split("/")
    return bool(key) and all(part not in ("", ".", "..") for part in parts)


def sync_file(path: Path) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


class WorkDir:
    """A local directory of temporary files, `<call id>.<what>.<random>.part`. A call's files
    are removed when its attempt ends, when it is taken up again after a crash, and by a sweep
    of old ones. Blocking file I/O (small: creating and removing files)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()

    def temp_file(self, call_id: int, what: str) -> Path:
        """A new, empty file; created exclusively (O_EXCL), so the name is ours alone."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.path, prefix=f"{call_id}.{what}.", suffix=".part")
        os.close(fd)
        return Path(name)

    def discard(self, *paths: Path | None) -> None:
        """Remove temporary files (missing ones are fine)."""
        for path in paths:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def discard_temps(self, call_id: int) -> int:
        """Remove every temporary file of one call; how many there were."""
        removed = 0
        for path in self._temps(f"{call_id}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def sweep_temps(self, older_than_sec: float) -> int:
        """Remove temporary files untouched for this long (their writer died)."""
        cutoff = time.time() - older_than_sec
        removed = 0
        for path in self._temps("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def temp_files(self) -> list[Path]:
        return self._temps("*")

    def _temps(self, pattern: str) -> list[Path]:
        if not self.path.is_dir():
            return []
        return list(self.path.glob(pattern))


def uses_object_store(audio: AudioSettings) -> bool:
    return bool(audio.store_url)


def work_dir(audio: AudioSettings) -> Path:
    """AUDIO_WORK_DIR, or its default: beside the files for the filesystem store (renames stay
    on one filesystem), the system's temporary directory for S3 (no shared directory)."""
    if audio.work_dir:
        return Path(audio.work_dir)
    if uses_object_store(audio):
        return Path(tempfile.gettempdir()) / "bcfy-audio-work"
    return Path(audio.store_dir) / FILESYSTEM_TEMP_DIR


# One store per process and configuration: an S3 client keeps its connections (and obstore's
# runtime) for the process's life. Checked by pid: nothing made before a fork is used after it.
_stores: dict[tuple[int, AudioSettings, ServiceSettings], AudioStore] = {}


def store_for(settings: Settings) -> AudioStore:
    """The audio store the settings name (AUDIO_STORE_URL, else AUDIO_STORE_DIR). Cheap: the
    S3 client is made on first use, in the process that uses it."""
    key = (os.getpid(), settings.audio, settings.services)
    store = _stores.get(key)
    if store is None:
        if len(_stores) > 8 or any(pid != key[0] for pid, _, _ in _stores):
            _stores.clear()
        if uses_object_store(settings.audio):
            from workers.audio.store.s3 import S3AudioStore

            store = S3AudioStore(settings.audio, settings.services)
        else:
            from workers.audio.store.filesystem import FilesystemAudioStore

            store = FilesystemAudioStore(settings.audio.store_dir, work_dir(settings.audio))
        _stores[key] = store
    return store
