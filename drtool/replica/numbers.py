"""The one way the replica server reads a number from a request: ASCII digits, bounded.

``int()`` accepts far more than HTTP means by a number (``+37``, `` 37 ``,
``1_000``, ``²`` and other Unicode digits, 4,300 digits before it gives up with
an error of its own); a header parsed one way here and another way by a proxy
in front is how requests are smuggled.  Every number of a request (the
Content-Length, a Range, a sequence number) goes through :func:`parse_count`.
"""

from __future__ import annotations

import re

from drtool.replica.problems import Problem

MAX_U64 = (1 << 64) - 1  # the wire's 64-bit fields (sequence numbers, offsets)
_DIGITS = re.compile(r"[0-9]{1,20}")  # 20 digits hold any 64-bit number


def parse_count(text: str | None, what: str, maximum: int = MAX_U64) -> int:
    """``text`` as a whole number in [0, maximum]; a 400 problem naming ``what`` otherwise."""
    if text is None or not _DIGITS.fullmatch(text):
        shown = text if text is None or len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"
        raise Problem(400, "Bad request", f"{what} {shown!r} is not a number (1-20 ASCII digits)")
    value = int(text)
    if value > maximum:
        raise Problem(400, "Bad request", f"{what} {value} is out of range (at most {maximum})")
    return value
