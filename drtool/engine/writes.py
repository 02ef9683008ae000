"""The engine's write path: a client write becomes region changes for the commit routine.

A write is split at region boundaries; each piece goes to the device (normal mode) or to the
overlay (degraded and resync modes) through :meth:`StateChanges.commit_region` (log, write,
maps).  A write covering part of a region reads and verifies the region first, so it never
blesses bad bytes.  A writer holds its region's stripe lock for the whole change.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import blake3

from drtool.engine import modes
from drtool.errors import DataUnavailable, DeviceError, DeviceIOError, DrtoolError, NotPermitted
from drtool.engine.changes import DEVICE, MIRROR, OVERLAY, RegionChange, _BaseLags
from drtool.storage.maps import BLOCK_SIZE, overlay_block_digest, zero_digest

log = logging.getLogger("drtool.engine")


class WritePath:
    """Mixed into :class:`drtool.engine.Engine` (which holds the state these methods use)."""

    def _check_writable(self) -> None:
        if self.read_only_reason:
            raise NotPermitted(f"volume {self.name} does not accept writes: {self.read_only_reason}")

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self.geometry.check_range(offset, len(view))
        position = 0
        with self._space_errors():
            for region, inner, length in self.geometry.split(offset, len(view)):
                self._write_region(region, inner, view[position:position + length])
                position += length
            self._after_write(fua)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self.geometry.check_range(offset, length)
        with self._space_errors():
            for region, inner, part in self.geometry.split(offset, length):
                self._write_region(region, inner, None, zero_length=part)
            self._after_write(fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: whole regions become zeros (kept verifiable); partial regions are left alone."""
        self._check_writable()
        self.geometry.check_range(offset, length)
        with self._space_errors():
            for region, inner, part in self.geometry.split(offset, length):
                if part == self.geometry.region_length(region):
                    self._write_region(region, inner, None, zero_length=part)
            self._after_write(fua)

    @contextmanager
    def _space_errors(self) -> Iterator[None]:
        """A write refused because a disk is full (the state directory's log or maps, the
        overlay, the device) says so: ENOSPC for an NBD client (the error's ``errno``), the path
        in its message and, at most every few seconds, in the log."""
        try:
            yield
        except DrtoolError as exc:
            if not out_of_space(exc):
                raise
            exc.errno = errno.ENOSPC
            now = time.monotonic()
            if now - getattr(self, "_space_logged", -_SPACE_LOG_EVERY) >= _SPACE_LOG_EVERY:
                self._space_logged = now
                log.error("volume %s: write refused, no space left: %s", self.name, exc)
            raise

    def _after_write(self, fua: bool) -> None:
        if fua:
            self.flush()
        if self.log.pending_bytes > self.settings["log_limit"] and self.replicator is not None:
            self.replicator.overflow()

    def flush(self) -> None:
        """Make every acknowledged write durable (a client's FLUSH, a FUA write): the log.

        The log is the volume's write-ahead log: every client write is a log record holding
        its bytes (or saying zeros), appended before the device or overlay is touched, and
        replay after a crash writes the records newer than the maps on disk back where they
        went (core._replay).  So a write is durable once its record is, as in a database;
        the data files are made durable by :meth:`sync_all` before the maps on disk claim a
        record (every checkpoint), which is also when the log may forget it.  One fdatasync
        of the log's tail per flush instead of that plus one of every data file; concurrent
        flushes share one (group commit, storage.replog)."""
        self.log.sync()

    def sync_all(self) -> None:
        """The log, then the data files (device, overlay): what the maps on disk may claim."""
        self.log.sync()
        for handle in (self.device, self.overlay):
            if handle is not None and handle.writable:
                handle.sync()

    def _write_region(self, region: int, inner: int, piece: memoryview | None, zero_length: int = 0) -> None:
        stripe = self.stripes[region % len(self.stripes)]
        for _ in range(_PREPARE_ATTEMPTS):
            try:
                with stripe:
                    if modes.is_normal(self.record):
                        try:
                            self._write_device(region, inner, piece, zero_length)
                            return
                        except _NeedsOverlay as why:
                            if not (self.settings["auto_degrade"] and self.protected):
                                raise DataUnavailable(
                                    f"volume {self.name}: cannot write region {region}: {why}") from None
                            self.enter_degraded(f"write to region {region} failed: {why}", auto=True)
                    self._write_overlay(region, inner, piece, zero_length)
                    return
            except _NeedsForcedReplication:
                # Forcing takes the replicator's lock, and the replicator takes stripes: never
                # while this one is held.  Nothing was logged or written yet: start again after.
                self._fetcher().prepare([region])
        raise DataUnavailable(f"volume {self.name}: region {region} kept changing while a partial "
                              "write waited for its replication; try again")

    def _content_for_write(self, region: int) -> bytearray:
        """The region's verified bytes, the base of a partial overlay write.  The caller holds the
        region's stripe, so this takes no other region's lock and never forces replication.
        A partial region's are its base with the overlay's blocks over it (changes._merged)."""
        volume = self.volume
        if volume.overlay.test(region):
            if self._partial(region):
                return self._merged(region)
            content = bytearray(self.geometry.region_length(region))
            if self._read_local(self.overlay, region, 1, region, memoryview(content)):
                raise DataUnavailable(f"volume {self.name}: overlay region {region} fails verification")
            return content
        # Not in the overlay: the base is the region's content (the write puts the region in the
        # overlay itself, so a fetched base is not stored by the fetch).
        return self._base_content(region)

    def _new_content(self, region: int, inner: int, piece: memoryview | None, zero_length: int,
                     base: Callable[[], bytearray]) -> tuple[memoryview | None, bytes, bool]:
        """The region's bytes after the write: (whole-region data or None for zeros, digest, whole)."""
        length = self.geometry.region_length(region)
        size = zero_length if piece is None else len(piece)
        if inner == 0 and size == length:
            if piece is None:
                return None, zero_digest(length), True
            return piece, blake3.blake3(piece).digest(), True
        content = base()
        content[inner:inner + size] = piece if piece is not None else bytes(size)
        return memoryview(content), blake3.blake3(content).digest(), False

    def _write_device(self, region: int, inner: int, piece: memoryview | None, zero_length: int) -> None:
        if self.device is None or not self.device.writable:
            raise _NeedsOverlay("the device is not available for writing")
        if self.volume.bad.test(region) and not (inner == 0 and (zero_length or len(piece or b"")) ==
                                                  self.geometry.region_length(region)):
            raise _NeedsOverlay("the region is bad")
        start, length = self.geometry.region_bounds(region)

        def base() -> bytearray:
            content = bytearray(length)
            try:
                self.device.readinto(content, start)
            except DeviceIOError as exc:
                self._set_bad([region], io_error=True)
                raise _NeedsOverlay(str(exc)) from None
            if not self.volume.manifest.matches(region, blake3.blake3(content).digest()):
                self._set_bad([region], io_error=False)
                raise _NeedsOverlay("its current bytes fail verification")
            return content

        content, digest, whole = self._new_content(region, inner, piece, zero_length, base)
        size = zero_length if piece is None else len(piece)
        try:
            self.commit_region(RegionChange(region, start + inner, size, piece, digest, MIRROR, DEVICE))
        except DeviceError as exc:
            self._set_bad([region], io_error=True)
            raise _NeedsOverlay(str(exc)) from None

    def _blocks_allowed(self, region: int) -> bool:
        """May a partial write of this region go to the overlay as blocks, its base left where it
        is?  Sub-region tracking needs block maps (regions larger than a block) and a base the
        overlay replica can fill from its mirror and check: recovery from the mirror at its
        current point in time (no local era: the base is the manifest's bytes, on the device
        unless bad), and a region whose mirror copy is not missing records (bitmap mode)."""
        recovery = self.record.recovery
        return (self.volume.overlay_blocks is not None and recovery is not None
                and recovery.source == "mirror" and recovery.local_era is None
                and not self.volume.norecord.test(region))

    def _write_blocks(self, region: int, inner: int, piece: memoryview | None, zero_length: int,
                      first: bool) -> None:
        """A partial write into a region the overlay does not hold whole, as whole blocks: the
        blocks go to the overlay and its block map, the rest of the region stays the base (read
        when the region is read, completed when it is failed back).  No base is read unless the
        write covers part of a block (that block's bytes are read, verified, merged).  ``first``:
        the overlay holds nothing of the region yet: a KIND_BASE record precedes this one."""
        start, length = self.geometry.region_bounds(region)
        size = zero_length if piece is None else len(piece)
        lo = inner - inner % BLOCK_SIZE
        end = inner + size
        hi = min(end + (-end) % BLOCK_SIZE, length)
        data: memoryview | bytearray | None = piece
        if lo != inner or hi != end:
            content = self._content_for_write(region)  # (rare: a write smaller than a block)
            data = content[lo:hi]
            data[inner - lo:end - lo] = piece if piece is not None else bytes(size)
            if hi - lo == length:  # its blocks are the whole region: a whole-region write
                self.commit_region(RegionChange(region, start, length, data, blake3.blake3(data).digest(),
                                                OVERLAY, OVERLAY))
                return
        if data is None:
            digests = [overlay_block_digest(_ZEROS[:min(BLOCK_SIZE, hi - at)]) for at in range(lo, hi, BLOCK_SIZE)]
        else:
            view = memoryview(data)
            digests = [overlay_block_digest(view[at - lo:at - lo + BLOCK_SIZE]) for at in range(lo, hi, BLOCK_SIZE)]
        self.commit_region(RegionChange(region, start + lo, hi - lo, data, None, OVERLAY, OVERLAY,
                                        overlay_blocks=(lo // BLOCK_SIZE, digests), base=first))

    def _write_overlay(self, region: int, inner: int, piece: memoryview | None, zero_length: int) -> None:
        start, length = self.geometry.region_bounds(region)
        in_overlay = self.volume.overlay.test(region)
        held = in_overlay and not self._partial(region)  # the overlay holds the region whole
        size = zero_length if piece is None else len(piece)
        if not held and not (inner == 0 and size == length) and self._blocks_allowed(region):
            self._write_blocks(region, inner, piece, zero_length, first=not in_overlay)
            return
        # A partial region that may not take blocks (bitmap mode since) is written whole below.
        content, digest, whole = self._new_content(
            region, inner, piece, zero_length, lambda: self._content_for_write(region))
        if held and not whole:
            # The overlay holds the region already: only the bytes written are logged, written
            # and shipped.  Replay after a crash finds the rest in the overlay (put there by an
            # earlier record, or synced before a checkpoint claimed it); the overlay replica
            # applies records in order, and fills a region it lacks (a copy-on-read region, kept
            # here but never shipped) from the mirror, which holds the bytes the fetch verified.
            size = zero_length if piece is None else len(piece)
            self.commit_region(RegionChange(region, start + inner, size, piece, digest, OVERLAY, OVERLAY))
            return
        # The first change of a region in the overlay writes and logs it whole: the overlay file
        # and its replay must not depend on a base read from elsewhere.  It ships as the bytes
        # written alone when the overlay replica can fill the rest from its mirror: the base was
        # verified against the manifest (the mirror source; a snapshot's bytes are another
        # version) and the mirror holds the manifest's bytes of the region once the records
        # before this one are applied (not so for a region in bitmap mode: its records dropped).
        patch = None
        recovery = self.record.recovery
        if (not whole and piece is not None and recovery is not None and recovery.source == "mirror"
                and not self.volume.norecord.test(region)):
            patch = (start + inner, len(piece))
        self.commit_region(RegionChange(region, start, length, content, digest, OVERLAY, OVERLAY, patch=patch))


def out_of_space(exc: BaseException) -> bool:
    """Was ``exc`` caused by a full disk (ENOSPC, EDQUOT, EFBIG anywhere in its chain)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if getattr(current, "errno", None) == errno.ENOSPC and not isinstance(current, OSError):
            return True
        current = current.__cause__ or current.__context__
    return False


_SPACE_LOG_EVERY = 10.0  # seconds between two log lines about writes refused for lack of space


class _NeedsOverlay(Exception):
    """Internal: the device cannot take this write; it must go to the overlay."""


# Internal: a partial write's base must come from the replica, which lacks its latest bytes.
_NeedsForcedReplication = _BaseLags
_ZEROS = bytes(BLOCK_SIZE)


# A partial write whose region lags is retried after forcing it; only a region rewritten
# concurrently every time could exhaust this.
_PREPARE_ATTEMPTS = 8
