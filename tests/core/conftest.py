"""Fixtures of the scheduler's tests: workers and beat of the tests' jobs app with short locks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Services


@pytest.fixture
def env(clean: Services, tmp_path: Path) -> dict[str, str]:
    """Locks of 3 s renewed every second; ticks stale after 30 s in the queue."""
    return clean.worker_env(
        tmp_path, LOCK_TTL_SEC="3", LOCK_RENEW_SEC="1", JOB_MISFIRE_GRACE_SEC="30"
    )


@pytest.fixture
def stop_grace() -> float:
    return 3  # the jobs here sleep for long; no test needs them finished after it
