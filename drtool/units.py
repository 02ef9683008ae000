"""Human sizes and durations: parsing what operators type, formatting what they read."""

from __future__ import annotations

import re

from drtool.errors import UsageError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse ``64K``, ``1M``, ``2GiB`` or a plain byte count.  Suffixes are binary."""
    if isinstance(text, int):
        if text < 0:
            raise UsageError(f"{what} must not be negative: {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"{what} {text!r} is not a size (examples: 4096, 64K, 1M, 2G)")
    number, unit, _ = match.groups()
    return int(number) << _SHIFT[unit.lower()]


def parse_rate(text: str | int | None) -> int | None:
    """Parse a throughput such as ``200M`` (bytes per second); None or 0 means unlimited."""
    if text in (None, "", 0, "0"):
        return None
    raw = str(text)
    if raw.lower().endswith("/s"):
        raw = raw[:-2]
    return parse_size(raw, "rate") or None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; exact powers print without decimals ('64 KiB')."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    return f"{format_bytes(bytes_per_second)}/s"


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
