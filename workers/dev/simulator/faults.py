"""The simulator's fault switches: what a test (or `POST /_sim/faults`) turns on at run time.

Counters (`fail_next_429`, ...) count down as they fire. Injected HTTP faults (429, 500, an
error in a 200, malformed JSON) replace a whole API answer before it is computed: nothing is
served, so nothing is billed. The feed's own quirks (`lastpos_zero_on_empty`, `reserve_overlap`,
`max_pos_age`, `duplicate_group_ts`) shape real answers, and whatever they serve is billed.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class AudioFault(enum.Enum):
    """What a call's audio url does (set per call with `publish_call(..., audio=...)`)."""

    OK = "ok"  # the clip, as the record says (duration, size)
    TRUNCATED = "truncated"  # 200 with the first 40 % of the clip's bytes (an honest length)
    MISSING = "missing"  # 404
    WRONG_TYPE = "wrong_type"  # 200, text/html: an error page where audio should be
    OVERSIZE = "oversize"  # 200, audio/mp4, `Faults.oversize_bytes` with a Content-Length
    OVERSIZE_UNDECLARED = "oversize_undeclared"  # the same, chunked: no Content-Length
    SILENCE = "silence"  # the silent clip (the record's duration and size are its own)
    REDIRECT_INTERNAL = "redirect_internal"  # 302 to the cloud metadata address
    REDIRECT_OK = "redirect_ok"  # 302 to another path on the simulator, which serves the clip


# Where REDIRECT_INTERNAL points: a link-local address no downloader may follow.
INTERNAL_REDIRECT_TARGET = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"

GEO_WRAPPERS = ("named", "data")


@dataclass
class Faults:
    """Mutable at any time; the server reads it on every request."""

    latency: float = 0.0  # seconds added to every API answer (not audio, not /_sim)
    fail_next_429: int = 0  # the next N API answers are HTTP 429 ...
    retry_after: int = 2  # ... with this Retry-After (seconds)
    fail_next_500: int = 0  # the next N API answers are HTTP 500
    error_in_200: int = 0  # the next N API answers are HTTP 200 with an errors body ...
    error_in_200_code: int = 103  # ... of this code
    malformed_json_next: int = 0  # the next N API answers are 200 with a truncated JSON body
    # The real service's quirk: lastPos 0 when an answer has no new calls. Default on.
    lastpos_zero_on_empty: bool = True
    # A buggy service: each live answer also re-serves the previous answer's new calls (billed).
    reserve_overlap: bool = False
    # The next N published calls each get a twin: same groupId and ts, its own url.
    duplicate_group_ts: int = 0
    # Limited retention: a live `pos` older than now - max_pos_age is answered only with calls
    # published after that, silently. None: unlimited. group_archives is not limited.
    max_pos_age: float | None = None
    # The service's rule "poll a selector no more often than every 5 s": a faster poll by the
    # same key id gets HTTP 429 with Retry-After. 0 turns the rule off.
    min_poll_interval: float = 5.0
    # The list wrapper key of the geo endpoints: "named" (countries / states / counties) or "data".
    geo_wrapper: str = "named"
    # How many bytes an OVERSIZE audio answer streams.
    oversize_bytes: int = 32 * 1024 * 1024

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from JSON (POST /_sim/faults); an unknown name or a bad type: ValueError."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name not in fields:
                raise ValueError(f"unknown fault {name!r}")
            checked[name] = _check(name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(name: str, value: Any) -> Any:
    if name in ("lastpos_zero_on_empty", "reserve_overlap"):
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false")
        return value
    if name == "geo_wrapper":
        if value not in GEO_WRAPPERS:
            raise ValueError(f"geo_wrapper: expected one of {', '.join(GEO_WRAPPERS)}")
        return value
    if name == "max_pos_age" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name}: expected a number >= 0")
    if name in ("latency", "max_pos_age", "min_poll_interval"):
        return float(value)
    if value != int(value):
        raise ValueError(f"{name}: expected a whole number")
    return int(value)
