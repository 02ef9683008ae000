"""Every constant and byte layout of the NBD protocol that drtool speaks.

The reference is NetworkBlockDevice/nbd ``doc/proto.md``.  drtool's server
implements the fixed newstyle handshake and simple replies; the values of
the options and commands it does not implement are listed anyway, so that
logs name what a client asked for.  All fields are big-endian.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum, IntFlag

# -- magic numbers ------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle magic and option magic
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# -- handshake ----------------------------------------------------------------


class HandshakeFlag(IntFlag):
    """16 bits the server sends after the magic numbers."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32 bits the client answers with; any other bit ends the connection."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Reply(IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


# -- transmission -------------------------------------------------------------


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1  # WRITE_ZEROES only
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NbdErrno(IntEnum):
    """The only error values a reply may carry (proto.md "Error values")."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Host errno values that have a protocol counterpart other than EIO.  The
# protocol asks for EDQUOT and EFBIG to be reported as ENOSPC; a read-only
# file system or a refused permission is what EPERM means to a client.
_ERRNO_TO_NBD = {
    errno.EPERM: NbdErrno.EPERM,
    errno.EACCES: NbdErrno.EPERM,
    errno.EROFS: NbdErrno.EPERM,
    errno.EIO: NbdErrno.EIO,
    errno.ENOMEM: NbdErrno.ENOMEM,
    errno.EINVAL: NbdErrno.EINVAL,
    errno.ENOSPC: NbdErrno.ENOSPC,
    errno.EDQUOT: NbdErrno.ENOSPC,
    errno.EFBIG: NbdErrno.ENOSPC,
    errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    errno.ENOTSUP: NbdErrno.ENOTSUP,
    errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> NbdErrno:
    """The reply error for a host errno; anything without a counterpart is EIO."""
    return _ERRNO_TO_NBD.get(host_errno or errno.EIO, NbdErrno.EIO)


# -- byte layouts ---------------------------------------------------------------

#: server greeting: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
#: client flags, the client's first message
CLIENT_FLAGS = struct.Struct(">I")
#: option request header: IHAVEOPT, option, length of the data that follows
OPTION_HEADER = struct.Struct(">QII")
#: option reply header: OPTION_REPLY_MAGIC, option, reply type, data length
OPTION_REPLY = struct.Struct(">QIII")
#: answer to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zero
#: bytes unless the client negotiated NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = bytes(124)
#: u32 length prefix of a name (NBD_REP_SERVER, NBD_OPT_INFO / GO data)
NAME_LENGTH = struct.Struct(">I")
#: u16 count of information requests, and each request (NBD_OPT_INFO / GO)
INFO_COUNT = struct.Struct(">H")
INFO_REQUEST = struct.Struct(">H")
#: NBD_REP_INFO payloads: type, then the fields of that type
INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
INFO_STRING = struct.Struct(">H")  # type, then a string (NAME, DESCRIPTION)
#: transmission request: magic, command flags, command, handle, offset, length
REQUEST = struct.Struct(">IHHQQI")
#: simple reply: magic, error, handle (then the data of a successful READ)
SIMPLE_REPLY = struct.Struct(">IIQ")

#: strings in the protocol "MUST be no longer than 4096 bytes"
MAX_STRING = 4096
#: block size every client may assume (proto.md "Block size constraints")
PREFERRED_BLOCK_SIZE = 4096
#: the largest READ/WRITE a client desiring interoperability sends (2^25)
DEFAULT_MAX_REQUEST = 32 * 1024 * 1024
