"""The filesystem store: AUDIO_STORE_DIR, on a local disk (or one volume shared by every host
that runs a pool). A file is written in the work directory, flushed to disk, then renamed to its
final name, so a crash never leaves a half file under a final name; a final name is only ever
replaced whole by the same call's next successful attempt."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from workers.audio.store import (
    StoreConfigError,
    StoredAudioMismatch,
    StoredAudioMissing,
    WorkDir,
    file_digest,
    sync_file,
)


class FilesystemAudioStore:
    """AudioStore on a directory."""

    def __init__(self, root: Path | str, work: Path | str | None = None) -> None:
        self.root = Path(root).resolve()
        self.work = WorkDir(work if work is not None else self.root / ".tmp")

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"{key!r} is outside the audio store")
        return path

    async def check(self, write: bool = False) -> None:
        """The directory can be written (a reader needs that too: it may remove files)."""

        def writable() -> None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.work.temp_file(0, "check").unlink()
            except OSError as exc:
                raise StoreConfigError(
                    f"AUDIO_STORE_DIR={self.root} (work directory {self.work.path}): "
                    f"cannot write there: {exc.strerror or exc}"
                ) from None

        await asyncio.get_running_loop().run_in_executor(None, writable)

    async def promote(self, files: Sequence[tuple[Path, str]]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._promote, files)

    def _promote(self, files: Sequence[tuple[Path, str]]) -> None:
        """Data to disk (already there when the writer used sync_file: then this is cheap),
        rename, then the renames to disk, one directory flush per directory."""
        directories: set[Path] = set()
        for temp, key in files:
            final = self.local_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            sync_file(temp)
            try:
                os.replace(temp, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                _copy_into_place(temp, final)  # AUDIO_WORK_DIR on another filesystem
            directories.add(final.parent)
        for directory in directories:
            _fsync_dir(directory)

    async def fetch(self, key: str, sha256: str | None, call_id: int) -> Path:
        """The stored file itself (no copy), once its digest matches."""
        return await asyncio.get_running_loop().run_in_executor(None, self._checked, key, sha256)

    def _checked(self, key: str, sha256: str | None) -> Path:
        path = self.local_path(key)
        try:
            _, digest = file_digest(path)
        except FileNotFoundError:
            raise StoredAudioMissing(2, "no such file", str(path)) from None
        if sha256 and digest != sha256:
            raise StoredAudioMismatch(
                f"{path}: its sha256 is {digest}, not the {sha256} recorded when it was stored"
            )
        return path

    def release(self, path: Path) -> None:
        if self.work.path in path.parents:
            self.work.discard(path)

    async def delete(self, keys: Sequence[str]) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self._delete, keys)

    def _delete(self, keys: Sequence[str]) -> int:
        removed = 0
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.local_path(key).unlink()
                removed += 1
        return removed

    async def link(self, key: str) -> str:
        return str(self.local_path(key))


def _copy_into_place(temp: Path, final: Path) -> None:
    """Copy beside the final name, flush, rename: still whole or nothing under the final name."""
    staging = final.with_name(f".{final.name}.{hashlib.sha1(str(temp).encode()).hexdigest()[:8]}")
    try:
        shutil.copyfile(temp, staging)
        sync_file(staging)
        os.replace(staging, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    temp.unlink()


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
