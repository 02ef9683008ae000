"""What the helpers may ask of the engine: one small typed interface each.

The engine (drtool.engine.Engine) is the only place that changes a volume's state.  The
helpers around it, drtool.fetch, drtool.replication, drtool.failback and drtool.roles,
receive it as one of these protocols: they read the volume's record and maps, and change
them only through the methods listed here (each takes the engine's locks itself; see
drtool.engine.changes for the rule).  They never call the engine's private names nor take
its locks.  Nothing here imports the engine: it satisfies these protocols structurally,
and this file stands below it, so a helper the engine itself uses (fetch) needs nothing
from the engine package.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from drtool.regions import Geometry
from drtool.storage.maps import RegionBitmap
from drtool.storage.record import VolumeRecord
from drtool.storage.records import Demoted, Loss, Replication
from drtool.storage.replog import ReplicationLog
from drtool.storage.volume import Volume


class Shipper(Protocol):
    """The volume's replicator, as the engine's other helpers use it."""

    def force(self, regions: list[int]) -> None: ...

    def wait_caught_up(self, timeout: float) -> None: ...


class VolumeView(Protocol):
    """What every helper reads: the volume's identity, record and maps (read only)."""

    name: str
    geometry: Geometry
    record: VolumeRecord
    volume: Volume
    replicator: Shipper | None

    @property
    def settings(self) -> dict[str, Any]: ...

    @property
    def protected(self) -> bool: ...


class FetchPort(VolumeView, Protocol):
    """For drtool.fetch.RemoteFetcher: the requested portion from the replica."""

    def local_bytes(self, region: int) -> bytes | None: ...

    def count_fetched(self, regions: int, nbytes: int) -> None: ...

    def store_fetched(self, region: int, data: bytes, digest: bytes, rollback: bool = False) -> None: ...

    def replica_holds(self, region: int, digest: bytes) -> bool: ...


class ReplicationPort(VolumeView, Protocol):
    """For drtool.replication: shipping the log, acknowledgements, bitmap mode, pairing."""

    log: ReplicationLog

    def relog_region(self, region: int) -> int | None: ...

    def settle_lost(self) -> RegionBitmap: ...

    def acknowledge(self, seqs: list[int]) -> None: ...

    def enter_bitmap_mode(self, now: float) -> int: ...

    def pair(self, peer: dict[str, Any], sync: Replication, lacking: Iterable[int] | None,
             lost: Loss | None = None) -> None: ...

    def update_peer(self, **settings: Any) -> None: ...

    def initial_sync_done(self) -> bool: ...

    def save(self) -> None: ...


class FailbackPort(VolumeView, Protocol):
    """For drtool.failback: the device back, the regions it lacks copied, back to normal."""

    def use_device(self, path: str) -> None: ...

    def scrub(self, progress: Any = None, record: bool = True) -> Any: ...

    def lost_regions(self) -> RegionBitmap: ...

    def settle_lost(self) -> RegionBitmap: ...

    def forget_overlay_copy(self, region: int) -> bool: ...

    def begin_resync(self, device: str) -> int: ...

    def fetch(self, regions: list[int]) -> dict[int, tuple[bytes, bytes]]: ...

    def holding(self, region: int) -> AbstractContextManager[None]: ...

    def read_verified(self, region: int, base: bytes | None = None) -> bytes | None: ...

    def partial_base_remote(self, region: int) -> bool: ...

    def copy_back(self, region: int, data: bytes, relog: bool) -> int: ...

    def failback_progress(self, nbytes: int) -> None: ...

    def finish_resync(self) -> bool: ...


class RolePort(VolumeView, Protocol):
    """For drtool.roles: handing the primary role over."""

    log: ReplicationLog

    def flush(self) -> None: ...

    def refuse_writes(self, reason: str | None) -> str | None: ...

    def become_secondary(self, demoted: Demoted) -> None: ...
