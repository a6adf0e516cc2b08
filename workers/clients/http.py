"""What an HTTP answer's status means, decided once for every client here: the Broadcastify API
client, the audio downloads and the transcription service's client.

    kind = status_class(response.status_code)    # SUCCESS, TRANSIENT or PERMANENT
    wait = retry_after_of(response)              # Retry-After of a transient answer, or None

Transient: worth asking again later (the service is busy, down or slow): 408 Request Timeout,
409 Conflict (OpenAI's lock timeouts), 425 Too Early, 429 Too Many Requests, and every 5xx. Its
Retry-After, when it has one, is honoured. Permanent: any other status outside 2xx; asking again
gets the same answer. What each client then does with a permanent refusal is its own: the
Broadcastify client fails the request, the transcription fails the call, the audio stage tries
the call again up to AUDIO_MAX_ATTEMPTS (workers.audio.download).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

import httpx

from workers.clients.retry_after import retry_after_sec

# The statuses below 500 that say "not now" rather than "no".
TRANSIENT_4XX = frozenset({408, 409, 425, 429})


class StatusClass(StrEnum):
    SUCCESS = "success"  # 2xx
    TRANSIENT = "transient"  # 408, 409, 425, 429, 5xx: ask again later
    PERMANENT = "permanent"  # anything else: asking again gets the same answer


def status_class(status: int) -> StatusClass:
    if 200 <= status < 300:
        return StatusClass.SUCCESS
    if status in TRANSIENT_4XX or status >= 500:
        return StatusClass.TRANSIENT
    return StatusClass.PERMANENT


def retry_after_of(response: httpx.Response, now: Callable[[], float] = time.time) -> float | None:
    """The seconds a transient answer asks us to wait (Retry-After, read by retry_after_sec on
    the clock `now`); None for any other answer, or one without a readable Retry-After."""
    if status_class(response.status_code) is not StatusClass.TRANSIENT:
        return None
    return retry_after_sec(response.headers.get("Retry-After"), now)
