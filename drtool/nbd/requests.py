"""Transmission requests: which ones the export may see, and running them.

Plain ints stand for the protocol's enums here: an enum member costs an
attribute lookup (and flag arithmetic an object) on every request.
"""

from __future__ import annotations

import logging

from drtool.nbd import protocol as p
from drtool.nbd.export import Buffer, NbdExport
from drtool.nbd.handshake import ExportRegistry, Session

log = logging.getLogger("drtool.nbd")

READ = int(p.Command.READ)
WRITE = int(p.Command.WRITE)
DISC = int(p.Command.DISC)
FLUSH = int(p.Command.FLUSH)
TRIM = int(p.Command.TRIM)
WRITE_ZEROES = int(p.Command.WRITE_ZEROES)
FUA = int(p.CommandFlag.FUA)
NO_HOLE = int(p.CommandFlag.NO_HOLE)
EINVAL = int(p.NbdErrno.EINVAL)
EPERM = int(p.NbdErrno.EPERM)
ENOSPC = int(p.NbdErrno.ENOSPC)


class RequestRules:
    """The checks a request passes before the export sees it (proto.md "Error values")."""

    def __init__(self, session: Session, max_request: int) -> None:
        self._size = session.size
        self._flags = session.flags
        self._max_request = max_request
        fua = FUA if session.flags.can_fua else 0
        self._allowed_flags = {READ: fua, WRITE: fua, FLUSH: fua, TRIM: fua,
                               WRITE_ZEROES: fua | NO_HOLE}

    def check(self, command: int, flags: int, offset: int, length: int) -> int:
        """The error the request gets without reaching the export, or 0."""
        allowed = self._allowed_flags.get(command)
        if allowed is None or flags & ~allowed:
            return EINVAL  # an unknown command, or a flag it does not take
        export_flags = self._flags
        end = offset + length
        if command == READ:
            if length > self._max_request or end > self._size:
                return EINVAL
        elif command == FLUSH:
            if not export_flags.can_flush:
                return EINVAL
        elif export_flags.read_only:  # WRITE, TRIM, WRITE_ZEROES
            return EPERM
        elif command == TRIM:
            if not export_flags.can_trim or end > self._size:
                return EINVAL
        elif command == WRITE_ZEROES and not export_flags.can_write_zeroes:
            return EINVAL
        elif end > self._size:  # WRITE, WRITE_ZEROES
            return ENOSPC
        return 0


def execute(exports: ExportRegistry, name: str, command: int, flags: int, offset: int,
            length: int, payload: memoryview | None, peer: str) -> tuple[int, list[Buffer], int]:
    """Run a checked request on export ``name``: (NBD error or 0, reply buffers, their length).

    The export is looked up for every request: the registry may have swapped it.
    """
    try:
        export: NbdExport | None = exports().get(name)
        if export is None:
            raise _ExportGone()
        if not length and command != FLUSH:
            return 0, [], 0  # nothing to read or change (proto.md: do not disconnect)
        if command == READ:
            buffers = list(export.read(offset, length))
            nbytes = 0
            for buffer in buffers:
                nbytes += memoryview(buffer).nbytes
            if nbytes != length:
                raise _BadExport(f"read of {length} bytes returned {nbytes}")
            return 0, buffers, nbytes
        if command == WRITE:
            export.write(offset, payload, bool(flags & FUA))
        elif command == FLUSH:
            export.flush()
        elif command == TRIM:
            export.trim(offset, length, bool(flags & FUA))
        else:
            export.write_zeroes(offset, length, bool(flags & FUA), not flags & NO_HOLE)
        return 0, [], 0
    except Exception as failure:
        code = getattr(failure, "errno", None)
        name = p.Command(command).name
        if isinstance(code, int):
            log.debug("nbd %s: %s at %d (+%d): %s", peer, name, offset, length, failure)
        else:
            log.exception("nbd %s: %s at %d (+%d) failed", peer, name, offset, length)
        return p.nbd_errno(code), [], 0


class _ExportGone(Exception):
    """The export was removed from the registry while a client used it."""

    errno = p.NbdErrno.ESHUTDOWN


class _BadExport(Exception):
    """The export broke its contract (a bug in the export, answered with EIO)."""
