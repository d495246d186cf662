"""Human units in configuration and output: sizes (``4MiB``), durations (``15m``), rates.

Sizes accept binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) suffixes, case
insensitive, with an optional space; a bare number is bytes. Durations accept ``ms``,
``s``, ``m``, ``h`` and ``d`` and may be compound (``1h30m``); a bare number is seconds.
Points in time (``restore --at``) are ISO 8601 times, or durations before now.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def parse_size(value: str | int | float) -> int:
    """Return a size in bytes; raise ValueError with the accepted forms on bad input."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return int(value)
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use a number of bytes or e.g. 512KiB, 4MiB, 1.5GB")
    assert unit is not None
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_share(value: str | int | float) -> float:
    """A share written as a percentage, ``50%`` or ``50``; returned as a fraction (0.5)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid share {value!r}")
    text = str(value).strip().removesuffix("%").strip()
    try:
        percent = float(text)
    except ValueError:
        raise ValueError(f"invalid share {value!r}: write a percentage, e.g. 50%") from None
    if not 0 <= percent <= 100:
        raise ValueError(f"invalid share {value!r}: must be within 0%..100%")
    return percent / 100


def parse_fraction(value: str | int | float) -> float:
    """A share of 1 written as a fraction (``0.5``) or a percentage (``50%``)."""
    text = str(value).strip()
    try:
        share = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise ValueError(f"invalid share {value!r}: write a fraction (0.5) or a percentage (50%)") from None
    if isinstance(value, bool) or not 0 <= share <= 1:
        raise ValueError(f"invalid share {value!r}: must be within 0..1 (0%..100%)")
    return share


def parse_rate(value: str | int | float) -> int:
    """A rate in bytes per second: ``200MiB/s``, ``1.5GB/s`` or a plain number of bytes."""
    if isinstance(value, str):
        text = value.strip()
        if not text.lower().endswith("/s"):
            raise ValueError(f"invalid rate {value!r}: write it per second, e.g. 200MiB/s")
        value = text[:-2]
    rate = parse_size(value)
    if rate <= 0:
        raise ValueError(f"invalid rate {value!r}: must be positive")
    return rate


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds; raise ValueError with the accepted forms on bad input."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"invalid duration {value!r}: must not be negative")
        return float(value)
    text = value.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for part in _DURATION_PART.finditer(text):
        if part.start() != pos:
            break
        total += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        pos = part.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r}: use seconds or e.g. 500ms, 30s, 15m, 1h30m, 2d")
    return total


def format_size(n: float) -> str:
    """Binary-unit rendering for humans: 0 B, 812 B, 4.0 MiB, 1.23 GiB."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_usd(amount: float) -> str:
    """Dollars for humans: cents from a cent up ($12.34), and below a cent two significant
    digits ($0.0036, not $0.00: a small spend is not nothing)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:.2f}"
    decimals = -math.floor(math.log10(abs(amount))) + 1
    return f"${amount:.{decimals}f}"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 source``, ``2 sources`` (``many``: the plural, when it is not ``word + "s"``)."""
    suffix = "S" if word.isupper() else "s"
    return f"{n} {word if n == 1 else many or word + suffix}"


def format_duration(seconds: float) -> str:
    """Compact rendering for humans: 0.42s, 12.0s, 3m05s, 2h10m, 3d4h."""
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def parse_time_point(value: str, now: datetime) -> datetime:
    """A moment given as an ISO 8601 time (UTC unless it carries an offset: ``2026-11-22T10:15Z``,
    ``2026-11-22 10:15``, ``2026-11-22``) or as a duration before ``now`` (``90m``, ``1d``)."""
    text = value.strip()
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: use ISO 8601 (2026-11-22T10:15:00Z) or a duration ago (90m, 2d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
