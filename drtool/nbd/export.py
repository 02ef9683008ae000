"""What the NBD server serves: the NbdExport protocol and its capability flags.

The server knows nothing of drtool's volumes; anything that implements
:class:`NbdExport` can be served.  Contract, for implementers:

- ``size()`` and ``flags()`` are called once per connection, when a client
  selects the export (NBD_OPT_GO / INFO / EXPORT_NAME); the answers hold for
  that connection.  The server checks every request against that size and
  those flags before the export sees it, so ``read``/``write``/... only ever
  get ranges inside ``[0, size)`` and only the operations advertised.
- The methods are called from several threads at once (several requests in
  flight per connection, several connections); an export must be
  thread-safe.
- ``read`` returns the buffers to send, in order, whose lengths sum to
  ``length`` (bytes, bytearray, memoryview or mmap slices; they are sent
  without a copy).
- ``write`` gets a memoryview of a buffer the server reuses after ``write``
  returns: copy what must outlive the call.
- ``fua=True`` means the data must be durable before the method returns.
- To fail a request, raise an exception with an ``errno`` attribute
  (:class:`drtool.errors.DrtoolError` subclasses and ``OSError`` have one);
  the client gets the matching NBD error.  An export that becomes read-only
  after the handshake raises an error with ``errno.EPERM`` from ``write``.
  Any other exception is a bug: it is logged and answered with EIO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from drtool.nbd.protocol import TransmissionFlag

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ExportFlags:
    """What an export can do, as advertised to one client at its handshake."""

    read_only: bool = False
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_write_zeroes: bool = False
    #: flushes and FUA writes are visible to every connection when answered
    #: (no per-connection cache), so a client may spread its I/O over several
    can_multi_conn: bool = False

    def transmission_flags(self) -> TransmissionFlag:
        flags = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if self.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if self.can_write_zeroes:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
        if self.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if self.can_fua:
            flags |= TransmissionFlag.SEND_FUA
        if self.can_multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return flags


class NbdExport(Protocol):
    """A byte range served over NBD.  See the module docstring for the contract."""

    name: str
    description: str

    def size(self) -> int: ...

    def flags(self) -> ExportFlags: ...

    def read(self, offset: int, length: int) -> Sequence[Buffer]: ...

    def write(self, offset: int, data: memoryview, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None: ...
