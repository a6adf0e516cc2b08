"""The store's start-up check, run in a child process: `python -m workers.audio.store.check`.

A Celery worker checks its store before it forks its pool, and obstore's runtime must not start
in a parent that forks (its threads would not follow): so the check runs in a short-lived child
of its own, which reads the same settings from its environment and says what is wrong on
stderr (exit status 2; the message names the setting and never holds the secret)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from workers.audio.store import StoreError, store_for, uses_object_store
from workers.core.settings import Settings, SettingsError, load_settings

# The variables the child needs beyond the environment: the settings as this process holds them
# (they may have been given otherwise than by the environment).
_STORE_VARIABLES = (
    "AUDIO_STORE_DIR",
    "AUDIO_STORE_URL",
    "AUDIO_S3_ENDPOINT",
    "AUDIO_S3_REGION",
    "AUDIO_S3_ACCESS_KEY_ID",
    "AUDIO_S3_PATH_STYLE",
    "AUDIO_WORK_DIR",
    "HTTP_CONNECT_TIMEOUT_SEC",
    "HTTP_TOTAL_TIMEOUT_SEC",
)


def check_store(settings: Settings, *, write: bool) -> str | None:
    """Run the check (S3: in a child); None when the store is usable, else what is wrong."""
    if not uses_object_store(settings.audio):
        try:
            asyncio.run(store_for(settings).check(write=write))
        except StoreError as exc:
            return str(exc)
        return None
    env = dict(os.environ)
    described = settings.describe()
    env.update({name: described[name] for name in _STORE_VARIABLES})
    env["AUDIO_S3_SECRET_ACCESS_KEY"] = settings.audio.s3_secret_access_key.reveal()
    # This code's own root first, whatever the worker's directory or PYTHONPATH.
    root = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Retries and timeouts are bounded by HTTP_TOTAL_TIMEOUT_SEC per step (three at most).
    limit = 4 * settings.services.http_total_timeout_sec + 30
    argv = [sys.executable, "-m", "workers.audio.store.check", *(["--write"] if write else [])]
    for _ in range(2):  # once more if the child was killed by a signal, not by its verdict
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired:
            return f"the audio store did not answer within {limit:g}s (AUDIO_S3_ENDPOINT)"
        if done.returncode >= 0:
            break
    if done.returncode == 0:
        return None
    return done.stderr.strip() or f"the store check exited with status {done.returncode}"


def main(argv: list[str]) -> int:
    try:
        settings = load_settings()
        asyncio.run(store_for(settings).check(write="--write" in argv))
    except (StoreError, SettingsError) as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Without the interpreter's shutdown: a process that exits right after one of obstore's
    # async calls sometimes aborts (SIGABRT, a runtime thread still finishing the call meets
    # the shutdown; about 1 in 15 here).
    os._exit(status)
