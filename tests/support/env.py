"""Parts of a worker's environment that tests of different stages set alike."""

from __future__ import annotations

from workers.dev.procs import ROOT

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


def env_file_text(values: dict[str, str]) -> str:
    """.env.example as a user fills it in: each value replaces its variable's line, or is added."""
    lines, seen = [], set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if not line.startswith("#") and "=" in line and name in values:
            lines.append(f"{name}={values[name]}")
            seen.add(name)
        else:
            lines.append(line)
    lines += [f"{name}={value}" for name, value in values.items() if name not in seen]
    return "\n".join(lines) + "\n"
