"""The streaming digest reader and the data-extent walk over sparse files."""

import errno
import os
import threading

import blake3
import pytest
from hypothesis import given, settings, strategies as st

from drtool.errors import DeviceError, DeviceIOError
from drtool.regions import Geometry, to_runs
from drtool.storage import reader
from drtool.storage.device import Device
from drtool.storage.reader import IO_ERROR, SHORT_READ, data_runs, digest_regions

RS = 65536
TIB = 1 << 40


def sparse_file(path, size, extents):
    """A file of ``size`` bytes holding data only at the given (offset, bytes) extents."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in extents:
            handle.seek(offset)
            handle.write(data)
    return path


def walk(path, geometry, targets=None):
    with Device(str(path)) as device:
        return list(data_runs(device.fd, geometry, targets or [(0, geometry.count)]))


def test_data_runs_finds_three_extents_in_a_tib(tmp_path):
    geometry = Geometry(TIB, RS)
    path = sparse_file(tmp_path / "big.img", TIB, [
        (5 * RS + 100, b"a" * 10),              # inside region 5
        (1000 * RS - 3, b"b" * 6),              # straddles regions 999 and 1000
        (TIB - 2 * RS, b"c" * (2 * RS)),        # the last two regions
    ])
    assert walk(path, geometry) == [(5, 1), (999, 2), (geometry.count - 2, 2)]


def test_data_runs_only_within_the_targets(tmp_path):
    geometry = Geometry(64 * RS, RS)
    path = sparse_file(tmp_path / "d.img", 64 * RS, [(2 * RS, b"x" * (10 * RS)), (40 * RS, b"y")])
    assert walk(path, geometry, [(0, 1), (4, 3), (12, 28), (41, 23)]) == [(4, 3)]
    assert walk(path, geometry, [(5, 1), (6, 1), (40, 1)]) == [(5, 2), (40, 1)]


def test_data_runs_of_a_hole_only_file_is_empty(tmp_path):
    geometry = Geometry(TIB, RS)
    assert walk(sparse_file(tmp_path / "h.img", TIB, []), geometry) == []


def test_data_runs_past_the_end_of_the_file_count_as_data(tmp_path):
    """A device that shrank must be read where it ends early: that is a short read, not zeros."""
    geometry = Geometry(100 * RS, RS)
    path = sparse_file(tmp_path / "s.img", 50 * RS + 7, [(10 * RS, b"z")])
    assert walk(path, geometry) == [(10, 1), (50, 50)]


def test_data_runs_without_seek_data_reads_everything(tmp_path, monkeypatch):
    geometry = Geometry(64 * RS, RS)
    path = sparse_file(tmp_path / "n.img", 64 * RS, [(3 * RS, b"q")])
    real = os.lseek

    def no_seek_data(fd, offset, whence):
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "not supported")
        return real(fd, offset, whence)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    assert walk(path, geometry, [(0, 10), (20, 5)]) == [(0, 10), (20, 5)]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_data_runs_agrees_with_asking_region_by_region(tmp_path_factory, data):
    rs = 4096
    count = data.draw(st.integers(1, 200))
    size = count * rs - data.draw(st.integers(0, rs - 1))
    geometry = Geometry(size, rs)
    extents = data.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 3 * rs)), max_size=8))
    path = sparse_file(tmp_path_factory.mktemp("h") / "f.img", size,
                       [(offset, b"\x01" * min(length, size - offset)) for offset, length in extents])
    chosen = data.draw(st.sets(st.integers(0, count - 1)))
    targets = to_runs(chosen)
    with Device(str(path)) as device:
        expected = []
        for region in sorted(chosen):
            start, length = geometry.region_bounds(region)
            try:
                if os.lseek(device.fd, start, os.SEEK_DATA) < start + length:
                    expected.append(region)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
        assert list(data_runs(device.fd, geometry, targets)) == to_runs(expected)


def collect(batches):
    digests, errors, read = {}, {}, 0
    for batch in batches:
        for region, digest in batch:
            assert region not in digests
            digests[region] = digest
        errors.update(batch.errors)
        read += batch.bytes_read
    return digests, errors, read


def test_digest_regions_streams_every_region_once(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK", 4 * RS)
    size = 37 * RS + 123
    payload = os.urandom(size)
    path = tmp_path / "r.img"
    path.write_bytes(payload)
    geometry = Geometry(size, RS)
    seen = []
    with Device(str(path)) as device:
        digests, errors, read = collect(digest_regions(device, geometry, [(0, 10), (20, 18)], progress=seen.append))
    assert sorted(digests) == list(range(10)) + list(range(20, 38)) and errors == {}
    for region, digest in digests.items():
        start, length = geometry.region_bounds(region)
        assert digest == blake3.blake3(payload[start:start + length]).digest()
    assert read == sum(seen) == 27 * RS + 123


class FlakyDevice(Device):
    span = (0, 0)

    def readinto(self, buffer, offset):
        start, end = self.span
        if offset < end and offset + len(buffer) > start:
            raise DeviceIOError(self.path, offset, len(buffer), "I/O error (EIO)")
        super().readinto(buffer, offset)


def test_digest_regions_pins_errors_to_their_regions(tmp_path):
    path = tmp_path / "e.img"
    path.write_bytes(os.urandom(20 * RS))
    geometry = Geometry(22 * RS, RS)  # the device ends two regions early: short reads
    device = FlakyDevice(str(path))
    device.span = (6 * RS + 1, 7 * RS + 1)
    with device:
        digests, errors, read = collect(digest_regions(device, geometry))
    assert errors == {6: IO_ERROR, 7: IO_ERROR, 20: SHORT_READ, 21: SHORT_READ}
    assert all((digests[r] is None) == (r in errors) for r in range(22))
    assert read == 18 * RS


def test_a_worker_failure_reaches_the_caller(tmp_path):
    class Vanishing(Device):
        def readinto(self, buffer, offset):
            raise DeviceError("device went away")

    path = tmp_path / "v.img"
    path.write_bytes(bytes(8 * RS))
    with Vanishing(str(path)) as device, pytest.raises(DeviceError, match="went away"):
        collect(digest_regions(device, Geometry(8 * RS, RS)))


def test_closing_early_stops_the_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK", RS)
    path = tmp_path / "c.img"
    path.write_bytes(bytes(200 * RS))
    before = threading.active_count()
    with Device(str(path)) as device:
        batches = digest_regions(device, Geometry(200 * RS, RS))
        next(batches)
        batches.close()
    assert threading.active_count() == before


# -- hashing from a mapping of the device (issue 12) -------------------------------------------

def _digests(path, geometry, mapped):
    with Device(str(path)) as device:
        found = {}
        for batch in digest_regions(device, geometry, mapped=mapped):
            for region, digest in batch:
                found[region] = (digest, batch.errors.get(region))
        return found


def test_mapped_and_copied_chunks_give_the_same_digests(tmp_path):
    size = 150 * RS + 1234  # more than one chunk, a partial last region
    path = tmp_path / "d.img"
    data = os.urandom(size)
    path.write_bytes(data)
    geometry = Geometry(size, RS)
    expected = {r: (blake3.blake3(data[r * RS:(r + 1) * RS]).digest(), None) for r in range(geometry.count)}
    assert _digests(path, geometry, mapped=True) == expected
    assert _digests(path, geometry, mapped=False) == expected


def test_a_device_shorter_than_the_volume_is_read_not_mapped_past_its_end(tmp_path):
    """A mapping past the end of a file would end the process with SIGBUS: the mapper leaves
    that part to preadv, which reports the short read region by region."""
    path = tmp_path / "short.img"
    path.write_bytes(os.urandom(10 * RS + 100))
    found = _digests(path, Geometry(80 * RS, RS), mapped=True)
    assert [r for r, (d, _) in found.items() if d is not None] == list(range(10))
    assert {why for r, (d, why) in found.items() if d is None} == {SHORT_READ}


def test_mapped_chunks_are_locked_while_hashed_and_fall_back_when_they_cannot_be(tmp_path, monkeypatch):
    """A populated page reclaimed before the hash would be read again, and an I/O error then is
    SIGBUS: the mapper locks the chunk's pages; where mlock fails the chunk is read with preadv."""
    from drtool.storage import reader

    size = 70 * RS
    path = tmp_path / "d.img"
    data = os.urandom(size)
    path.write_bytes(data)
    geometry = Geometry(size, RS)
    expected = {r: (blake3.blake3(data[r * RS:(r + 1) * RS]).digest(), None) for r in range(geometry.count)}
    locked, mapped_chunks = [], []
    real_lock, real_map = reader._libc.mlock, reader._Mapper.map

    def counting_lock(address, length):
        result = real_lock(address, length)
        locked.append((length, result))
        return result

    def counting_map(self, offset, length):
        mapped = real_map(self, offset, length)
        mapped_chunks.append(mapped is not None)
        return mapped

    monkeypatch.setattr(reader._libc, "mlock", counting_lock)
    monkeypatch.setattr(reader._Mapper, "map", counting_map)
    assert _digests(path, geometry, mapped=True) == expected
    assert locked and all(result == 0 for _, result in locked)
    assert all(mapped_chunks) and len(mapped_chunks) == len(locked)

    mapped_chunks.clear()
    monkeypatch.setattr(reader._libc, "mlock", lambda address, length: -1)  # RLIMIT_MEMLOCK
    assert _digests(path, geometry, mapped=True) == expected
    assert mapped_chunks and not any(mapped_chunks)
