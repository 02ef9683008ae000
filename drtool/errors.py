"""Every error drtool raises, and every exit code it returns.

Errors are raised where the fact is known (the file that is torn, the peer that
refused) and rendered once, at the edge: the CLI prints ``drtool: <message>``
and exits with the error's code; the Ansible modules pass the message to
``fail_json``.  Nothing else in the code base defines an exit code.

    DrtoolError                      1  unexpected failure
    ├── UsageError                   2  bad arguments or input (name, size, range)
    ├── StateError                   5  state directory problems
    │   ├── VolumeNotFound
    │   ├── VolumeExists
    │   ├── GroupNotFound
    │   └── CorruptStateFile         a torn, truncated or foreign state file
    ├── VolumeBusy                   6  another process holds the volume
    │   └── ExportBusy               NBD clients or an operation keep it in the agent
    ├── DeviceError                  4  the volume's device is missing or unusable
    ├── PeerError                    7  the replica server could not be used
    │   ├── PeerUnreachable
    │   ├── PeerAuthError
    │   └── PeerProtocolError
    ├── DataUnavailable              8  bytes that cannot be served correctly
    │   ├── RegionsLost
    │   └── VerificationFailed
    ├── OperationTimeout             9  a wait did not finish in time
    ├── NotPermitted                10  the volume's mode or role forbids this
    │   └── ConfirmationNeeded       it would take data back in time: say so with a flag
    └── Conflict                    11  the request contradicts existing state
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes.  README.md documents the same table."""

    OK = 0
    ERROR = 1
    USAGE = 2
    BAD_REGIONS = 3  # scrub/status: the volume has bad regions (DEGRADED)
    FAULTED = 4  # the device is missing or unreadable
    STATE = 5
    BUSY = 6
    PEER = 7
    DATA_UNAVAILABLE = 8
    TIMEOUT = 9
    NOT_PERMITTED = 10
    CONFLICT = 11


class DrtoolError(Exception):
    """Base of every error drtool raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR
    #: errno an NBD reply or a file-like caller should see for this error.
    errno: int = errno.EIO

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DrtoolError):
    exit_code = ExitCode.USAGE
    errno = errno.EINVAL


class StateError(DrtoolError):
    exit_code = ExitCode.STATE


class VolumeNotFound(StateError):
    def __init__(self, name: str, state_root: str) -> None:
        super().__init__(f"volume {name} is not registered under {state_root}")
        self.name = name


class GroupNotFound(StateError):
    def __init__(self, name: str, state_root: str) -> None:
        super().__init__(f"group {name} is not defined under {state_root} (drtool group create {name} VOLUME...)")
        self.name = name


class VolumeExists(StateError):
    def __init__(self, name: str, state_dir: str) -> None:
        super().__init__(
            f"volume {name} is already registered at {state_dir} (use --force to re-register)"
        )
        self.name = name


class CorruptStateFile(StateError):
    """A state file failed a check.  It is never reset silently."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing state file {path}: {reason}")
        self.path = path
        self.reason = reason


class UpgradeNeeded(StateError):
    """The state directory is in an older format: it is never misread, and says what to run."""

    def __init__(self, path: str, name: str, found: str) -> None:
        self.path = path
        super().__init__(
            f"{path}: volume {name}'s state is in {found}; run `drtool upgrade {name}` "
            "(it converts the state in place and is safe to interrupt and run again)")


class VolumeBusy(DrtoolError):
    exit_code = ExitCode.BUSY
    errno = errno.EBUSY

    def __init__(self, name: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"volume {name} is in use by {holder}")
        self.name = name
        self.pid = pid


class ExportBusy(VolumeBusy):
    """The volume cannot leave the agent now: NBD clients are connected, or an operation runs."""

    def __init__(self, message: str) -> None:
        DrtoolError.__init__(self, message)


class DeviceError(DrtoolError):
    exit_code = ExitCode.FAULTED


class DeviceIOError(DeviceError):
    """An I/O error (or short read) at a known byte range of the device."""

    def __init__(self, path: str, offset: int, length: int, reason: str) -> None:
        super().__init__(f"{path}: {reason} at offset {offset} (+{length})")
        self.path = path
        self.offset = offset
        self.length = length
        self.reason = reason


class PeerError(DrtoolError):
    exit_code = ExitCode.PEER


class PeerUnreachable(PeerError):
    pass


class PeerAuthError(PeerError):
    errno = errno.EACCES


class PeerProtocolError(PeerError):
    pass


class DataUnavailable(DrtoolError):
    exit_code = ExitCode.DATA_UNAVAILABLE
    errno = errno.EIO


class RegionsLost(DataUnavailable):
    def __init__(self, volume: str, runs: list[tuple[int, int]]) -> None:
        shown = ", ".join(f"{a}" if n == 1 else f"{a}-{a + n - 1}" for a, n in runs[:8])
        more = "" if len(runs) <= 8 else f" and {len(runs) - 8} more runs"
        super().__init__(
            f"volume {volume}: regions {shown}{more} are lost "
            "(bad locally, never replicated, no log record left)"
        )
        self.runs = runs


class VerificationFailed(DataUnavailable):
    pass


class OperationTimeout(DrtoolError):
    exit_code = ExitCode.TIMEOUT
    errno = errno.ETIMEDOUT


class NotPermitted(DrtoolError):
    exit_code = ExitCode.NOT_PERMITTED
    errno = errno.EPERM


class ConfirmationNeeded(NotPermitted):
    """The operation would change what clients read in a way they did not ask for (a recovery
    from a snapshot takes regions back to the snapshot's time): nothing changed; the message
    lists what would, and names the flag that confirms it."""


class Conflict(DrtoolError):
    """E.g. a replica that exists with another geometry or identity, a snapshot name taken."""

    exit_code = ExitCode.CONFLICT
    errno = errno.EEXIST


def rebuild(type_name: str, message: str) -> DrtoolError:
    """The error a remote drtool process (the agent) reported, as the same class here."""
    cls = globals().get(type_name)
    if not (isinstance(cls, type) and issubclass(cls, DrtoolError)):
        cls = DrtoolError
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.message = message
    return error
