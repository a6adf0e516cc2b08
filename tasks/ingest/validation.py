"""Record validation: which of the service's call records can be stored, and why not.

`validate_call` turns one record into the row to store, or raises Rejected with the reason the
quarantine keeps; `split_page` does it for a whole answer, so one bad record never fails the
page. The limits below tell a broken record from a real one. Nothing here touches the database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.core.records import (
    DEFAULT_MAX_RECORD_BYTES,
    JSON,
    BadValue,
    bounded_copy,
    json_bytes,
    real_number,
    show,
    whole_number,
)

# Limits that tell a broken record from a real one. A record breaking one is quarantined.
EARLIEST_TS = 946_684_800  # 2000-01-01: no call on the service is older
FUTURE_SLACK_SEC = 86_400  # a ts more than a day past the service's clock is broken
MAX_CALL_SEC = 3_600  # one transmission longer than an hour is a broken record
MAX_GROUP_ID = 100
MAX_URL = 2_048
MAX_TEXT = 1_000  # talkgroup descriptions and labels are short
INT4 = 2**31 - 1
INT8 = 2**63 - 1

# Typed columns: (record field, row key, kind, lowest, highest).
_INTEGERS = (
    ("sid", "sid", -INT4, INT4),
    ("siteId", "site", -INT4, INT4),
    ("nodeId", "node", -INT8, INT8),
    ("feedId", "feed", -INT4, INT4),
    ("tgId", "tg", -INT4, INT4),
    ("tag", "tag", -INT4, INT4),
    ("src", "src", -INT8, INT8),
    ("size", "size", 0, INT8),
)
_TEXTS = (("descr", "descr"), ("display", "display"), ("grouping", "gr"))


class Rejected(ValueError):
    """A record that cannot be stored as a call; the message is the quarantine reason."""


def validate_call(
    record: object, latest_ts: float, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> dict[str, Any]:
    """The row to store for one call record, or Rejected with the reason; never any other
    exception, whatever the record holds.

    Types are those the service serves; whole numbers may also come as integral floats or
    ASCII digit strings (tolerated), anything else of the wrong type is rejected. A record
    whose JSON is over max_record_bytes (BCFY_MAX_RECORD_BYTES) is rejected: `raw` keeps
    every field, known or not, so its size is bounded here.
    """
    if not isinstance(record, dict):
        raise Rejected(f"record is not an object but {type(record).__name__}")
    try:
        size = json_bytes(record)
    except BadValue as exc:
        raise Rejected(f"record {exc}") from None
    if size > max_record_bytes:
        raise Rejected(
            f"record is oversize: {size} bytes of JSON, over BCFY_MAX_RECORD_BYTES"
            f" ({max_record_bytes})"
        )
    group_id = record.get("groupId")
    if group_id is None:
        raise Rejected("missing groupId")
    if not isinstance(group_id, str) or not group_id.strip():
        raise Rejected(f"groupId is not a non-empty string: {show(group_id)}")
    if len(group_id) > MAX_GROUP_ID:
        raise Rejected(f"groupId is oversize ({len(group_id)} characters)")
    if record.get("ts") is None:
        raise Rejected("missing ts")
    ts = _whole(record, "ts", EARLIEST_TS, latest_ts)
    url = record.get("url")
    if url is None:
        raise Rejected("missing url")
    if not isinstance(url, str):
        raise Rejected(f"url is not a string: {show(url)}")
    if len(url) > MAX_URL:
        raise Rejected(f"url is oversize ({len(url)} characters)")
    if not url.startswith(("http://", "https://")) or len(url.split("/", 3)[2]) == 0:
        raise Rejected(f"url is not an http(s) URL: {show(url)}")
    if any(c.isspace() for c in url):
        raise Rejected("url contains white space")

    duration = _number(record, "duration", -math.inf, math.inf)
    if duration is not None:
        if duration < 0:
            raise Rejected(f"duration is negative: {_fmt(duration)}")
        if duration > MAX_CALL_SEC:
            raise Rejected(f"duration is absurd: {_fmt(duration)} s (over {MAX_CALL_SEC} s)")
    start = _number(record, "start_ts", EARLIEST_TS, latest_ts)
    end = _number(record, "end_ts", EARLIEST_TS, latest_ts + MAX_CALL_SEC)
    start = float(ts) if start is None else start
    if end is not None:
        if end < start:
            raise Rejected(f"end_ts ({_fmt(end)}) is before the start ({_fmt(start)})")
        if end - start > MAX_CALL_SEC:
            raise Rejected(f"call is absurdly long: {_fmt(end - start)} s from start to end_ts")
        if duration is None:
            duration = end - start
    elif duration is not None:
        end = start + duration

    row: dict[str, Any] = {
        "g": group_id,
        "ts": ts,
        "st": start,
        "en": end,
        "d": duration,
        "url": url,
    }
    for name, key, low, high in _INTEGERS:
        value = record.get(name)
        row[key] = None if value is None else _whole(record, name, low, high)
    freq = _number(record, "freq", 0, 1e6)
    row["freq"] = freq
    for name, key in _TEXTS:
        value = record.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise Rejected(f"{name} is not a string: {show(value)}")
            if len(value) > MAX_TEXT:
                raise Rejected(f"{name} is oversize ({len(value)} characters)")
        row[key] = value
    row["raw"] = record
    return row


def _whole(record: dict[str, Any], name: str, low: float, high: float) -> int:
    try:
        return whole_number(record[name], name, low, high)
    except BadValue as exc:
        raise Rejected(str(exc)) from None


def _number(record: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    try:
        return real_number(value, name, low, high)
    except BadValue as exc:
        raise Rejected(str(exc)) from None


def _fmt(number: float) -> str:
    return show(float(number))


@dataclass
class Page:
    """What one request returned, split into rows to store and rejected records."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, JSON]] = field(default_factory=list)  # (reason, record)

    @property
    def received(self) -> int:
        return len(self.rows) + len(self.rejected)


def split_page(
    records: Sequence[JSON], latest_ts: float, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Page:
    """Validate each record of an answer: one bad record never fails the page. A rejected
    record is kept for the quarantine as it came, or cut to about max_record_bytes of JSON
    (marked truncated) when larger."""
    page = Page()
    for record in records:
        try:
            page.rows.append(validate_call(record, latest_ts, max_record_bytes=max_record_bytes))
        except Rejected as exc:
            page.rejected.append((str(exc), bounded_copy(record, max_record_bytes)))
    return page
