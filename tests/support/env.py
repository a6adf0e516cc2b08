"""Parts of a worker's environment that tests of different stages set alike."""

from __future__ import annotations

# One connection in a process's pool: a connection held where none should be (across a download
# or a recogniser's request) then stops everything else, instead of going unnoticed.
ONE_DB_CONNECTION = {
    "DB_POOL_MIN_SIZE": "1",
    "DB_POOL_MAX_SIZE": "1",
    "DB_CONNECT_TIMEOUT_SEC": "3",
}


def http_timeouts(sec: float) -> dict[str, str]:
    """The shared HTTP client's read and whole-exchange timeouts."""
    return {"HTTP_READ_TIMEOUT_SEC": f"{sec:g}", "HTTP_TOTAL_TIMEOUT_SEC": f"{sec:g}"}
