"""Where prepared audio lives: a small interface, and its filesystem backend (AUDIO_STORE_DIR).

Layout, relative to the store's root (these relative paths are what call_audio records):

    <playlist uuid>/<YYYY-MM-DD of the call's start, UTC>/<call id>.<ext>       the original
    <playlist uuid>/<YYYY-MM-DD>/<call id>.16k.flac                             for recognisers
    .tmp/<call id>.<what>.<random>.part                                         work in progress

Files are written under .tmp/ (the same filesystem), flushed to disk, then renamed to their
final name, so a crash never leaves a half file under a final name; a final name is only ever
replaced whole by the same call's next successful attempt. Temporary files of a call are removed
when its attempt ends, when the call is taken up again after a crash, and by a sweep of old
ones. Everything here is blocking file I/O: call it from an executor.

An S3-compatible backend can implement the same interface later (temporary files stay local;
`promote` uploads); compose mounts one shared volume meanwhile.
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

TEMP_DIR = ".tmp"
PREPARED_SUFFIX = ".16k.flac"


class AudioStore(Protocol):
    def temp_file(self, call_id: int, what: str) -> Path:
        """A new, empty local file, unique, for work in progress on one call."""
        ...

    def promote(self, files: Sequence[tuple[Path, str]]) -> None:
        """Make each temporary file durable under its key, atomically (write, then rename)."""
        ...

    def discard(self, *paths: Path | None) -> None:
        """Remove temporary files (missing ones are fine)."""
        ...

    def discard_temps(self, call_id: int) -> int:
        """Remove every temporary file of one call; how many there were."""
        ...

    def sweep_temps(self, older_than_sec: float) -> int:
        """Remove temporary files untouched for this long (their writer died)."""
        ...

    def local_path(self, key: str) -> Path:
        """Where a stored file can be read on this host."""
        ...


def call_keys(
    call_id: int, playlist_uuid: UUID | None, started_at: datetime, extension: str
) -> tuple[str, str]:
    """(original key, prepared key) of one call: playlist / date / call."""
    playlist = str(playlist_uuid) if playlist_uuid else "no-playlist"
    day = started_at.strftime("%Y-%m-%d")
    base = PurePosixPath(playlist, day)
    return str(base / f"{call_id}.{extension}"), str(base / f"{call_id}{PREPARED_SUFFIX}")


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


class FilesystemAudioStore:
    """AudioStore on a local (or shared, mounted) directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.temp_dir = self.root / TEMP_DIR

    def temp_file(self, call_id: int, what: str) -> Path:
        """Created empty and exclusively (O_EXCL), so the name is ours alone."""
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.temp_dir, prefix=f"{call_id}.{what}.", suffix=".part")
        os.close(fd)
        return Path(name)

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{key!r} is outside the audio store")
        return path

    def promote(self, files: Sequence[tuple[Path, str]]) -> None:
        """Data to disk (already there when the writer used sync_file: then this is cheap),
        rename, then the renames to disk, one directory flush per directory."""
        directories: set[Path] = set()
        for temp, key in files:
            final = self.local_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            sync_file(temp)
            os.replace(temp, final)
            directories.add(final.parent)
        for directory in directories:
            _fsync_dir(directory)

    def discard(self, *paths: Path | None) -> None:
        for path in paths:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def discard_temps(self, call_id: int) -> int:
        removed = 0
        for path in self._temps(f"{call_id}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def sweep_temps(self, older_than_sec: float) -> int:
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
        if not self.temp_dir.is_dir():
            return []
        return list(self.temp_dir.glob(pattern))


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
