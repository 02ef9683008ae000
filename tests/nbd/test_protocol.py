"""Protocol values that real clients do not exercise: errno mapping, flag sets."""

from __future__ import annotations

import errno

from drtool.errors import DeviceIOError, NotPermitted, OperationTimeout, VolumeBusy
from drtool.nbd import ExportFlags
from drtool.nbd.protocol import NbdErrno, TransmissionFlag, nbd_errno


def test_host_errors_map_to_the_errors_the_protocol_allows() -> None:
    assert nbd_errno(errno.EDQUOT) == nbd_errno(errno.EFBIG) == NbdErrno.ENOSPC
    assert nbd_errno(errno.EROFS) == nbd_errno(errno.EACCES) == NbdErrno.EPERM
    assert nbd_errno(errno.ETIMEDOUT) == nbd_errno(errno.ENOENT) == NbdErrno.EIO
    assert nbd_errno(None) == NbdErrno.EIO
    assert nbd_errno(NotPermitted("x").errno) == NbdErrno.EPERM
    assert nbd_errno(DeviceIOError("dev", 0, 1, "bad").errno) == NbdErrno.EIO
    assert nbd_errno(OperationTimeout("slow").errno) == NbdErrno.EIO
    assert nbd_errno(VolumeBusy("v", 1).errno) == NbdErrno.EIO


def test_read_only_exports_do_not_offer_writes() -> None:
    flags = ExportFlags(read_only=True, can_flush=True, can_trim=True, can_write_zeroes=True)
    advertised = flags.transmission_flags()
    assert advertised & TransmissionFlag.READ_ONLY
    assert not advertised & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
    assert advertised & TransmissionFlag.HAS_FLAGS


def test_multi_conn_only_when_the_export_says_so() -> None:
    assert not ExportFlags().transmission_flags() & TransmissionFlag.CAN_MULTI_CONN
    assert ExportFlags(can_multi_conn=True).transmission_flags() & TransmissionFlag.CAN_MULTI_CONN
