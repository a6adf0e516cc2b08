"""The one backoff: how long a failed attempt waits before the next, in every stage.

    delay = backoff_sec(attempt, base=30, cap=3600, retry_after=failure.retry_after)

Exponential (base x 2^(attempt-1)) with jitter (a random factor within +-JITTER, so that calls
which failed together are not all tried again in the same second), never shorter than what the
service asked for (Retry-After), never longer than `cap`, rounded to a tenth of a second for
the logs. Used by the audio stage (AUDIO_RETRY_BASE_SEC, AUDIO_RETRY_MAX_SEC) and the
transcription stage (TRANSCRIBE_RETRY_BACKOFF_SEC, TRANSCRIBE_RETRY_BACKOFF_MAX_SEC). The
Broadcastify client's retries within one request use tenacity's wait_exponential_jitter, whose
waits a Retry-After may lengthen up to the retry budget (workers.clients.broadcastify).
"""

from __future__ import annotations

import random

JITTER = 0.2  # each wait is the exponential one times a factor in [0.8, 1.2]

# Past this many doublings every wait is the cap anyway; the bound keeps 2.0 ** n finite.
_MOST_DOUBLINGS = 1000


def backoff_sec(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first): between
    (1 - JITTER) and (1 + JITTER) times base x 2^(attempt-1), at least `retry_after` when the
    service gave one, and at most `cap` whatever Retry-After asks."""
    doublings = min(max(attempt - 1, 0), _MOST_DOUBLINGS)
    wait = base * 2.0**doublings * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        wait = max(wait, retry_after)
    # Rounded for the logs, then capped: rounding must not lift a wait past the cap.
    return min(round(wait, 1), cap)
