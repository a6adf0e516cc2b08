"""Retry-After, read the same way by every HTTP client here: the Broadcastify API client, the
audio downloads and the transcription service's client."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable


def retry_after_sec(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After in seconds from now: a number of seconds, or an HTTP date measured on the
    clock `now`. None when absent or unreadable; never negative."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
