"""Reading values out of the service's answers: the one place that turns outside JSON into
numbers, and that knows what PostgreSQL's jsonb can hold and how big a record may be.

Every function here raises nothing but `BadValue` (a ValueError whose message is a short,
printable reason naming the field) whatever it is given: any JSON value, unicode digits that
`str.isdigit()` accepts and `int()` refuses ("¹²"), digit strings past Python's 4,300-digit
limit, integers past the float range, NaN, NUL characters, lone surrogates.

    size = whole_number(record.get("size"), "size", 0, INT8)   # int, or BadValue
    length = whole_number_or_none(headers.get("Content-Length"), "Content-Length", 0)
    freq = real_number(record.get("freq"), "freq", 0, 1e6)     # float, or BadValue
    data = parse_json(body)                                    # huge int literals kept as text
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from typing import TypeAlias, overload

# A JSON value as parse_json returns it, and a JSON object (what the service's answers are).
JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"
JSONObject: TypeAlias = "dict[str, JSON]"

# No number the service sends needs more digits (int8 has 19); longer digit strings are refused
# before int() sees them.
MAX_DIGITS = 40
_WHOLE = re.compile(rf"-?[0-9]{{1,{MAX_DIGITS}}}")  # ASCII digits only: not "¹²", not "١٢"

# The largest record kept as it came (JSON bytes); BCFY_MAX_RECORD_BYTES, this by default.
DEFAULT_MAX_RECORD_BYTES = 64 * 1024


class BadValue(ValueError):
    """A value from outside that is not what the field needs; the message says why."""


def whole_number(value: object, name: str, low: float = -math.inf, high: float = math.inf) -> int:
    """An integer, an integral float or a string of ASCII digits (an optional minus sign and
    surrounding white space allowed) within [low, high]."""
    if isinstance(value, bool):
        raise BadValue(f"{name} is not a whole number: {show(value)}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise BadValue(f"{name} is not a whole number: {show(value)}")
    if not low <= number <= high:
        raise BadValue(f"{name} is out of range: {show(number)}")
    return number


def whole_number_or_none(
    value: object, name: str, low: float = -math.inf, high: float = math.inf
) -> int | None:
    """whole_number, or None where the value is absent or not one: for a header or a field
    that may be left out or garbled without failing what carries it."""
    try:
        return whole_number(value, name, low, high)
    except BadValue:
        return None


def real_number(value: object, name: str, low: float, high: float) -> float:
    """A finite number (or a string float() reads as one) within [low, high]."""
    if isinstance(value, bool):
        raise BadValue(f"{name} is not a number: {show(value)}")
    if isinstance(value, int):
        if value.bit_length() > 1024:  # past the float range: float() would raise
            raise BadValue(f"{name} is out of range: {show(value)}")
        number = float(value)
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and len(value) <= 100:
        try:
            number = float(value)
        except ValueError:
            raise BadValue(f"{name} is not a number: {show(value)}") from None
    else:
        raise BadValue(f"{name} is not a number: {show(value)}")
    if not math.isfinite(number):
        raise BadValue(f"{name} is not a finite number")
    if not low <= number <= high:
        raise BadValue(f"{name} is out of range: {show(number)}")
    return number


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 60, 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4


def show(value: object) -> str:
    """A short, safe rendering of any value for a reason or an error message (never raises:
    no huge-integer conversion, no deep recursion, never more than about 90 characters)."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"
    if isinstance(value, str):
        text = repr(value[:53])
        return text if len(value) <= 53 else f"{text}... ({len(value)} characters)"
    try:
        text = _repr.repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


# --- JSON --------------------------------------------------------------------------------------


def _int_or_text(text: str) -> int | str:
    """A JSON integer literal; one Python refuses to convert (over 4,300 digits) stays text,
    so the field holding it is refused, not the whole answer."""
    try:
        return int(text)
    except ValueError:
        return text


def parse_json(data: bytes | str) -> JSON:
    """JSON text (UTF-8/16/32 bytes or str) as Python values.

    Raises BadValue for text that is not JSON or nests past the parser's depth."""
    try:
        value: JSON = json.loads(data, parse_int=_int_or_text)
        return value
    except RecursionError:
        raise BadValue("nested too deeply to read") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadValue(f"malformed JSON ({exc})") from None


def json_bytes(value: object) -> int:
    """The size of a value written as compact JSON, in UTF-8 bytes. BadValue when it cannot
    be written at all (nesting deeper than the writer goes, a number past 4,300 digits)."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise BadValue("nested too deeply to store") from None
    except (ValueError, TypeError) as exc:
        raise BadValue(f"cannot be written as JSON ({str(exc)[:80]})") from None
    return len(text.encode("utf-8", "surrogatepass"))


def jsonb_problem(value: object) -> str | None:
    """Why PostgreSQL's jsonb would refuse this value, or None."""
    if isinstance(value, str):
        if "\x00" in value:
            return "a string holds a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a string holds an invalid character (lone surrogate)"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a number is NaN or infinite"
    if isinstance(value, dict):
        items: list[object] = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        problem = jsonb_problem(item)
        if problem:
            return problem
    return None


@overload
def storable(value: str) -> str: ...
@overload
def storable(value: JSON) -> JSON: ...
def storable(value: JSON) -> JSON:
    """The value with whatever jsonb (or a text column) cannot hold replaced: NUL and lone
    surrogates by U+FFFD, NaN and infinities by their names."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def as_text(value: object) -> str | None:
    """A value for a text column: strings as they came (less what PostgreSQL cannot hold),
    numbers written out, anything else shown short; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, int | float):  # bools too
        return storable(str(value))
    return show(value)


def bounded_copy(value: JSON, max_bytes: int) -> JSON:
    """A storable copy of a record of at most about max_bytes of JSON: the record itself when
    it fits, else {"truncated": true, "bytes": its size, "json_head": the start of its JSON}."""
    try:
        size = json_bytes(value)
    except BadValue:
        size = None
    if size is not None and size <= max_bytes:
        return storable(value)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, RecursionError):
        text = show(value)
    head = text.encode("utf-8", "replace")[: max(0, max_bytes - 100)].decode("utf-8", "ignore")
    return {"truncated": True, "bytes": size, "json_head": storable(head)}
