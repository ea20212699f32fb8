"""
The value checks every LiteLLM management body shares: keys, users, teams,
organisations, customers and models name their fields alike
(C{max_budget}, C{budget_duration}, C{tpm_limit}, C{models}, C{metadata},
...) and mean the same by them, so one function per kind of value says
what is accepted, and each names the field at fault (the 400's C{param}).

Pure: no I/O.  Durations are here too (C{30s} ... C{1mo}), since budgets,
expiries and key rotation all use them.
"""

from __future__ import annotations

import calendar
import datetime
import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DURATION_WORDS",
    "DuplicateKey",
    "InvalidField",
    "MAX_COUNT",
    "MAX_TEXT",
    "boolean",
    "budget_duration",
    "count",
    "duration",
    "empty",
    "json_value",
    "metadata",
    "model_aliases",
    "model_budgets",
    "model_limits",
    "models",
    "money",
    "parse_duration",
    "strings",
    "text",
]

MAX_TEXT = 256
MAX_MODELS = 1000
MAX_METADATA_BYTES = 16 * 1024
MAX_ALIASES = 1000
MAX_COUNT = 2**53  # rpm / tpm: any larger is not a limit a JSON client can mean
#: Durations are capped, so that an expiry always fits a datetime.
MAX_DURATION_SECONDS = 100 * 366 * 86400

_DURATION = re.compile(r"(\d{1,10})(mo|[smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MONTH_APPROXIMATION = 30 * 86400
#: LiteLLM's words for budget durations.
DURATION_WORDS = {"hourly": "1h", "daily": "24h", "weekly": "7d", "monthly": "30d"}


class InvalidField(ValueError):
    """A field is malformed; C{field} names it (the 400's C{param})."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateKey(InvalidField):
    """A caller-chosen key, a key alias or an id that another record already has."""


# --------------------------------------------------------------------------
# Durations


def _months_ahead(now: float, months: int) -> float:
    """Seconds from C{now} to the same day and time C{months} calendar months later (UTC)."""
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    index = start.month - 1 + months
    year = start.year + index // 12
    month = index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return (start.replace(year=year, month=month, day=day) - start).total_seconds()


def split_duration(text: object) -> tuple[int, str]:
    """
    A LiteLLM duration's whole number and unit (C{s}, C{m}, C{h}, C{d},
    C{w}, C{mo}); LiteLLM's words (C{daily} ...) are read as their
    durations.

    @raise ValueError: anything else, or a number that is not positive.
    """
    if not isinstance(text, str):
        raise ValueError("a duration must be a string such as \"30s\", \"24h\" or \"7d\"")
    stripped = text.strip()
    match = _DURATION.fullmatch(DURATION_WORDS.get(stripped.lower(), stripped))
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: use a whole number and s, m, h, d, w or mo"
            " (e.g. \"30s\", \"15m\", \"24h\", \"7d\", \"1mo\")"
        )
    value, unit = int(match.group(1)), match.group(2)
    if value <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return value, unit


def parse_duration(text: object, now: float | None = None) -> float:
    """
    Seconds of a LiteLLM duration: a whole number and one of C{s}, C{m}
    (minutes), C{h}, C{d}, C{w}, C{mo} (calendar months: the same day of the
    month, clamped to its last day, counted from C{now} in UTC; 30 days each
    when C{now} is not given).  C{30s}, C{15m}, C{24h}, C{7d}, C{2w},
    C{1mo}.  Surrounding spaces are ignored; the number must be positive and
    the duration at most 100 years.

    @raise ValueError: anything else.
    """
    value, unit = split_duration(text)
    if unit == "mo":
        if value > 1200:
            raise ValueError(f"the duration {text!r} is longer than 100 years")
        seconds = _MONTH_APPROXIMATION * value if now is None else _months_ahead(now, value)
    else:
        seconds = value * _DURATION_UNITS[unit]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"the duration {text!r} is longer than 100 years")
    return float(seconds)


# --------------------------------------------------------------------------
# Values


def empty(value: Any) -> bool:
    """What SDKs send for a field they were not given: null, false, "", 0, {} or []."""
    return value is None or value is False or value in ("", 0) or value == {} or value == []


def text(field: str, value: Any) -> str | None:
    """A short string without control characters; C{""} and null are None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidField(field, f"'{field}' must be a string")
    if len(value) > MAX_TEXT:
        raise InvalidField(field, f"'{field}' is longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidField(field, f"'{field}' contains control characters")
    return value


def strings(field: str, value: Any, limit: int = MAX_MODELS) -> tuple[str, ...]:
    """A list of distinct non-empty short strings, in order; null is empty."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidField(field, f"'{field}' must be a list of strings")
    if len(value) > limit:
        raise InvalidField(field, f"'{field}' has more than {limit} entries")
    out: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not item:
            raise InvalidField(field, f"'{field}' must be a list of non-empty strings")
        out[text(field, item)] = None  # type: ignore[index]
    return tuple(out)


def models(field: str, value: Any) -> tuple[str, ...]:
    """A model allow-list (empty: every model)."""
    if value is not None and not isinstance(value, (list, tuple)):
        raise InvalidField(field, f"'{field}' must be a list of model names")
    return strings(field, value)


def money(field: str, value: Any) -> float | None:
    """US dollars, a finite number >= 0; null is None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidField(field, f"'{field}' must be a number (US dollars)")
    if value < 0:
        raise InvalidField(field, f"'{field}' must not be negative")
    return float(value)


def count(field: str, value: Any) -> int | None:
    """A whole number >= 0 (C{10.0} is 10); null is None."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise InvalidField(field, f"'{field}' must be a whole number")
    if value < 0:
        raise InvalidField(field, f"'{field}' must not be negative")
    if value > MAX_COUNT:
        raise InvalidField(field, f"'{field}' is too large")
    return int(value)


def duration(field: str, value: Any) -> str | None:
    """A duration L{parse_duration} reads, stripped; C{""} and null are None."""
    if value is None or value == "":
        return None
    try:
        parse_duration(value)
    except ValueError as e:
        raise InvalidField(field, f"'{field}': {e}") from None
    return value.strip()


def budget_duration(field: str, value: Any) -> str | None:
    """
    A budget's reset schedule: a duration (L{duration}) or one of
    LiteLLM's words (C{hourly}, C{daily}, C{weekly}, C{monthly}), kept as
    written.
    """
    return duration(field, value)


def boolean(field: str, value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidField(field, f"'{field}' must be true or false")


def json_value(field: str, value: Any, limit: int = MAX_METADATA_BYTES) -> Any:
    """Any JSON value of at most C{limit} bytes, as a private copy."""
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidField(field, f"'{field}' must hold JSON values only") from None
    if len(encoded.encode("utf-8")) > limit:
        raise InvalidField(field, f"'{field}' is larger than {limit} bytes")
    return json.loads(encoded)


def metadata(field: str, value: Any) -> dict:
    """A JSON object of at most 16 KiB; null is C{{}}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be a JSON object")
    return json_value(field, value)


def model_aliases(field: str, value: Any) -> dict:
    """
    A name -> model name mapping (a key's C{aliases}, a team's
    C{model_aliases}): strings as L{text} checks them, at most
    L{MAX_ALIASES}; None is no alias.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be an object mapping model names to model names")
    if len(value) > MAX_ALIASES:
        raise InvalidField(field, f"'{field}' has more than {MAX_ALIASES} entries")
    out: dict[str, str] = {}
    for name, target in value.items():
        name = text(field, name)
        target = text(field, target)
        if name is None or target is None:
            raise InvalidField(field, f"'{field}' must map non-empty names to non-empty model names")
        out[name.strip()] = target.strip()
    return out


def model_limits(field: str, value: Any) -> dict[str, int]:
    """C{model_rpm_limit} / C{model_tpm_limit}: model name -> a whole number >= 0."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be an object mapping model names to whole numbers")
    if len(value) > MAX_ALIASES:
        raise InvalidField(field, f"'{field}' has more than {MAX_ALIASES} entries")
    out: dict[str, int] = {}
    for name, limit in value.items():
        checked_name = text(field, name)
        checked = count(field, limit)
        if checked_name is None or checked is None:
            raise InvalidField(field, f"'{field}' must map model names to whole numbers")
        out[checked_name] = checked
    return out


def _budget_entry(field: str, model: str, entry: Any) -> dict[str, Any]:
    # LiteLLM has written this three ways: a number, {"budget_limit",
    # "time_period"} (its GenericBudgetInfo) and {"max_budget", "budget_duration"}.
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        limit: Any = entry
        period: Any = None
    elif isinstance(entry, Mapping):
        unknown = set(entry) - {"budget_limit", "time_period", "max_budget", "budget_duration"}
        if unknown:
            raise InvalidField(field, f"'{field}' for {model!r} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
        limit = entry.get("max_budget", entry.get("budget_limit"))
        period = entry.get("budget_duration", entry.get("time_period"))
    else:
        raise InvalidField(field, f"'{field}' for {model!r} must be a number or an object with max_budget")
    if isinstance(limit, str):
        # LiteLLM's own examples send the limit as a string ("0.0000001").
        try:
            limit = float(limit)
        except ValueError:
            raise InvalidField(field, f"'{field}' for {model!r}: the budget must be a number") from None
    checked = money(field, limit)
    if checked is None:
        raise InvalidField(field, f"'{field}' for {model!r} needs a budget")
    return {"max_budget": checked, "budget_duration": budget_duration(field, period)}


def model_budgets(field: str, value: Any) -> dict[str, dict[str, Any]]:
    """
    C{model_max_budget}: model name -> C{{"max_budget": dollars,
    "budget_duration": duration or None}} (a plain number, and LiteLLM's
    C{{"budget_limit", "time_period"}}, are read as the same).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be an object mapping model names to budgets")
    if len(value) > MAX_ALIASES:
        raise InvalidField(field, f"'{field}' has more than {MAX_ALIASES} entries")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        checked_name = text(field, name)
        if checked_name is None:
            raise InvalidField(field, f"'{field}' must map model names to budgets")
        out[checked_name] = _budget_entry(field, checked_name, entry)
    return out
