"""The simulator's reference data: a small, realistic slice of the common (geographic) data, and
the radio systems, talkgroups and nodes its calls come from.

Ids are plausible, not the service's real ones (US state ids follow FIPS, as the service's do).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

COUNTRIES: list[dict[str, Any]] = [
    {"coid": 1, "country_name": "United States", "country_code": "USA", "iso_alpha2": "US"},
    {"coid": 2, "country_name": "Canada", "country_code": "CAN", "iso_alpha2": "CA"},
]

STATES: list[dict[str, Any]] = [
    {"stid": 6, "coid": 1, "state_name": "California", "state_code": "CA"},
    {"stid": 17, "coid": 1, "state_name": "Illinois", "state_code": "IL"},
    {"stid": 36, "coid": 1, "state_name": "New York", "state_code": "NY"},
    {"stid": 48, "coid": 1, "state_name": "Texas", "state_code": "TX"},
    {"stid": 60, "coid": 2, "state_name": "Ontario", "state_code": "ON"},
    {"stid": 61, "coid": 2, "state_name": "Quebec", "state_code": "QC"},
]

# ctid, stid, name, type, fips, lat, lon, range (miles), timezone
_COUNTY_ROWS: list[tuple[int, int, str, str, str, float, float, int, str]] = [
    (193, 6, "Los Angeles", "County", "06037", 34.3207, -118.2249, 60, "America/Los_Angeles"),
    (201, 6, "San Diego", "County", "06073", 33.0236, -116.7761, 50, "America/Los_Angeles"),
    (203, 6, "San Francisco", "County", "06075", 37.7749, -122.4194, 10, "America/Los_Angeles"),
    (578, 17, "Cook", "County", "17031", 41.8401, -87.8167, 30, "America/Chicago"),
    (580, 17, "DuPage", "County", "17043", 41.8520, -88.0857, 15, "America/Chicago"),
    (603, 17, "Lake", "County", "17097", 42.3494, -87.8616, 20, "America/Chicago"),
    (1833, 36, "Erie", "County", "36029", 42.7584, -78.7787, 25, "America/New_York"),
    (1839, 36, "Kings", "County", "36047", 40.6350, -73.9501, 8, "America/New_York"),
    (1855, 36, "New York", "County", "36061", 40.7769, -73.9710, 6, "America/New_York"),
    (2600, 48, "Dallas", "County", "48113", 32.7668, -96.7779, 20, "America/Chicago"),
    (2636, 48, "Harris", "County", "48201", 29.8577, -95.3936, 35, "America/Chicago"),
    (2777, 48, "Travis", "County", "48453", 30.3345, -97.7820, 20, "America/Chicago"),
    (3055, 60, "Ottawa", "City", "", 45.4215, -75.6972, 25, "America/Toronto"),
    (3061, 60, "Toronto", "City", "", 43.6532, -79.3832, 20, "America/Toronto"),
    (3130, 61, "Montreal", "Urban Agglomeration", "", 45.5017, -73.5673, 20, "America/Toronto"),
    (3134, 61, "Quebec", "Urban Agglomeration", "", 46.8139, -71.2080, 20, "America/Toronto"),
]

_STATE_BY_ID = {s["stid"]: s for s in STATES}
_COUNTRY_BY_ID = {c["coid"]: c for c in COUNTRIES}


def _county_detail(row: tuple[int, int, str, str, str, float, float, int, str]) -> dict[str, Any]:
    ctid, stid, name, kind, fips, lat, lon, range_mi, tz = row
    state = _STATE_BY_ID[stid]
    country = _COUNTRY_BY_ID[state["coid"]]
    header = f"{name} {kind}" if kind == "County" else name
    return {
        "ctid": ctid,
        "stid": stid,
        "coid": country["coid"],
        "county_name": name,
        "county_header": f"{header}, {state['state_name']}",
        "type": kind,
        "lat": lat,
        "lon": lon,
        "range": range_mi,
        "fips": fips,
        "timezone": tz,
        "state_name": state["state_name"],
        "state_code": state["state_code"],
        "country_name": country["country_name"],
        "country_code": country["country_code"],
    }


COUNTY_DETAILS: dict[int, dict[str, Any]] = {row[0]: _county_detail(row) for row in _COUNTY_ROWS}
COUNTIES: list[dict[str, Any]] = [
    {"ctid": d["ctid"], "stid": d["stid"], "county_name": d["county_name"], "type": d["type"]}
    for d in COUNTY_DETAILS.values()
]


def states_of(coid: int) -> list[dict[str, Any]] | None:
    if coid not in _COUNTRY_BY_ID:
        return None
    return [s for s in STATES if s["coid"] == coid]


def counties_of(stid: int) -> list[dict[str, Any]] | None:
    if stid not in _STATE_BY_ID:
        return None
    return [c for c in COUNTIES if c["stid"] == stid]


# --- radio systems, talkgroups and nodes ----------------------------------------------------


def camel_json(record: Any) -> dict[str, Any]:
    """A dataclass as the service writes it: its fields in order, named in camelCase
    (`node_id` -> `nodeId`)."""
    return {_camel(f.name): getattr(record, f.name) for f in dataclasses.fields(record)}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class Node:
    node_id: int
    sid: int
    site_id: int
    name: str
    ctid: int
    lat: float
    lon: float


@dataclass(frozen=True)
class Group:
    """A talkgroup (`<sid>-<tg>`) or a conventional channel (`c-<feedId>`)."""

    group_id: str
    sid: int
    site_id: int
    node_id: int
    feed_id: int
    tg_id: int
    tag: int
    freq: float
    descr: str
    display: str
    grouping: str
    ctid: int


# sid, siteId, nodeId, feedId, ctid, system name, control channel (MHz), lat, lon
_SYSTEMS = [
    (2431, 1, 5012, 21431, 578, "Chicago Area P25", 851.0125, 41.8781, -87.6298),
    (6643, 2, 5120, 26643, 193, "Los Angeles County ICIS", 484.6625, 34.0522, -118.2437),
    (8109, 1, 6027, 28109, 1855, "New York City Citywide", 470.4125, 40.7128, -74.0060),
]
# tgId, tag (service tag id), description, display, grouping
_TALKGROUPS = [
    (1001, 2, "Police Dispatch - District 1", "PD Disp 1", "Police"),
    (1002, 2, "Police Dispatch - District 2", "PD Disp 2", "Police"),
    (1101, 6, "Police Tactical 1", "PD Tac 1", "Police"),
    (2001, 3, "Fire Dispatch", "FD Disp", "Fire"),
    (2002, 8, "Fire Ground 1", "FD Fireground 1", "Fire"),
    (3001, 4, "EMS Dispatch", "EMS Disp", "EMS"),
    (3002, 4, "EMS Hospital Link", "EMS Hosp", "EMS"),
    (4001, 12, "Public Works", "DPW", "Public Works"),
]

NODES: dict[int, Node] = {
    nid: Node(nid, sid, site, f"{name} - Site {site}", ctid, lat, lon)
    for sid, site, nid, _feed, ctid, name, _cc, lat, lon in _SYSTEMS
}


def _make_roster() -> dict[str, Group]:
    roster: dict[str, Group] = {}
    for sid, site, nid, feed, ctid, name, control, _lat, _lon in _SYSTEMS:
        for i, (tg, tag, descr, display, grouping) in enumerate(_TALKGROUPS):
            freq = round(control + 0.0125 * (i + 1), 4)
            roster[f"{sid}-{tg}"] = Group(
                f"{sid}-{tg}", sid, site, nid, feed, tg, tag, freq, descr, display, grouping, ctid
            )
        # One conventional channel per area, as the service lists scanner feeds.
        conv = f"c-{feed + 1}"
        roster[conv] = Group(
            conv, 0, 0, nid, feed + 1, 0, 3, 154.43, f"{name} Fire", "Fire Conv", "Fire", ctid
        )
    return roster


ROSTER = _make_roster()
_GROUP_ID = re.compile(r"^(?:(\d{1,9})-(\d{1,9})|c-(\d{1,9}))$")


def group_for(group_id: str) -> Group:
    """The roster's group, or a plausible one made up from a well-formed id."""
    if group_id in ROSTER:
        return ROSTER[group_id]
    match = _GROUP_ID.match(group_id)
    if not match:
        raise ValueError(f"groupId {group_id!r} is neither '<sid>-<tg>' nor 'c-<feedId>'")
    if match.group(3):
        feed_id = int(match.group(3))
        return Group(
            group_id,
            0,
            0,
            0,
            feed_id,
            0,
            3,
            154.43,
            f"Channel {feed_id}",
            f"Ch {feed_id}",
            "Conventional",
            0,
        )
    sid, tg = int(match.group(1)), int(match.group(2))
    return Group(group_id, sid, 1, 0, 0, tg, 2, 851.5, f"Talkgroup {tg}", f"TG {tg}", "Unknown", 0)
