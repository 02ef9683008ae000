"""Page-aligned buffers for bulk I/O.

A bytearray's data starts a few bytes into a page, so every page the kernel copies into
it (read, preadv, recv_into) straddles two pages: measured here, reads into a bytearray
ran at about half the speed of reads into an aligned buffer.  Every buffer that bulk data
is read into comes from here.
"""

from __future__ import annotations

import ctypes

PAGE = 4096


def aligned_bytes(size: int) -> memoryview:
    """A writable, zeroed, page-aligned buffer of ``size`` bytes.

    A page-aligned window into a slightly larger bytearray: it lives and dies with the
    returned view, like any bytearray."""
    raw = bytearray(size + PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(raw))
    start = -address % PAGE
    return memoryview(raw)[start:start + size]
