"""Scrub finds exactly the damaged regions; scan accepts outside writes; faults are faults."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from drtool import api
from drtool.errors import DeviceError, DeviceIOError
from drtool.storage.device import Device
from drtool.storage.volume import Volume
from tests.conftest import corrupt, make_image

RS = 65536
SIZE = 40 * RS + 1000  # a partial last region (region 40, 1000 bytes)


@pytest.fixture
def device(tmp_path, state_root):
    path = tmp_path / "dev.img"
    make_image(path, SIZE)
    api.init_volume("vol", str(path), "64K")
    return path


def scrub():
    return api.scrub_volume("vol")


def test_clean_volume_scrubs_clean(device):
    report = scrub()
    assert report["bad_regions"] == [] and report["health"] == "ONLINE"
    assert report["bytes_scanned"] == SIZE and report["regions_total"] == 41


def test_single_byte_marks_one_region(device):
    corrupt(device, 5 * RS + 17)
    assert scrub()["bad_regions"] == [[5, 1]]


def test_several_whole_regions(device):
    for region in (2, 3, 4, 30):
        corrupt(device, region * RS, b"\0" * RS)
    report = scrub()
    assert report["bad_regions"] == [[2, 3], [30, 1]]
    assert report["errors"]["checksum"] == 4


def test_partial_last_region(device):
    corrupt(device, SIZE - 1)
    assert scrub()["bad_regions"] == [[40, 1]]


def test_region_rewritten_clean_leaves_the_bad_map(device):
    original = device.read_bytes()[7 * RS:8 * RS]
    corrupt(device, 7 * RS + 9)
    assert scrub()["bad_regions"] == [[7, 1]]
    with open(device, "r+b") as handle:
        handle.seek(7 * RS)
        handle.write(original)
    report = scrub()
    assert report["bad_regions"] == [] and report["cleared_regions"] == [[7, 1]]


class FlakyDevice(Device):
    """Raises EIO for reads touching [start, end): a test double around the read call."""

    span = (0, 0)

    def readinto(self, buffer, offset):
        start, end = self.span
        if offset < end and offset + len(buffer) > start:
            raise DeviceIOError(self.path, offset, len(buffer), "I/O error (EIO)")
        super().readinto(buffer, offset)


def test_eio_marks_exactly_the_regions_hit(device, monkeypatch):
    FlakyDevice.span = (12 * RS + 100, 14 * RS + 1)  # touches 12, 13, 14
    monkeypatch.setattr(Volume, "open_device",
                        lambda self, writable=False, path=None: FlakyDevice(path or self.record.device))
    report = scrub()
    assert report["bad_regions"] == [[12, 3]]
    assert report["errors"]["io-error"] == 3 and report["errors"]["checksum"] == 0


def test_short_read_marks_exactly_the_regions_past_the_end(device, monkeypatch):
    """The device shrinks after scrub saw its full size: the regions it no longer holds are
    short reads, each marked bad; the ones before are verified as usual."""
    from drtool import detect

    real_probe = detect.probe

    def probe_then_shrink(path, expected_size):
        found = real_probe(path, expected_size=expected_size)
        with open(device, "r+b") as handle:
            handle.truncate(38 * RS + 10)
        return found

    monkeypatch.setattr(detect, "probe", probe_then_shrink)
    report = scrub()
    assert report["bad_regions"] == [[38, 3]]
    assert report["errors"]["short-read"] == 3 and report["errors"]["io-error"] == 0
    assert report["errors"]["checksum"] == 0


def test_truncated_device_short_reads_fault(device):
    with open(device, "r+b") as handle:
        handle.truncate(SIZE - 2 * RS)
    report = scrub()
    assert report["health"] == "FAULTED"
    assert "needs" in report["faulted"]


def test_deleted_device_faults_the_volume(device):
    os.unlink(device)
    report = scrub()
    assert report["health"] == "FAULTED"
    assert "does not exist" in report["faulted"]
    status = api.status("vol")[0]
    assert status["health"] == "FAULTED" and status["bad_count"] == 41


def test_device_returns_and_scrubs_online(device, state_root):
    data = device.read_bytes()
    os.unlink(device)
    assert scrub()["health"] == "FAULTED"
    with Volume.inspect(str(state_root), "vol") as vol:
        since = vol.record.faulted.since
    assert scrub()["health"] == "FAULTED"
    with Volume.inspect(str(state_root), "vol") as vol:
        assert vol.record.faulted.since == since  # faulted since the first scrub that saw it
    device.write_bytes(data)
    report = scrub()
    assert report["health"] == "ONLINE" and report["bad_regions"] == []


def test_scan_accepts_outside_writes(device):
    corrupt(device, 3 * RS, b"new!")
    corrupt(device, 20 * RS + 5, b"x")
    api.checkpoint("vol")
    report = api.scan_volume("vol")
    assert report["changed_regions"] == [[3, 1], [20, 1]] and report["era"] == 2
    assert scrub()["bad_regions"] == []
    with Volume.open(os.environ["DRTOOL_STATE_ROOT"], "vol") as vol:
        assert vol.eras[3] == 2 and vol.eras[4] == 0  # 0: not written since registration


def test_scan_clears_a_bad_region_whose_bytes_were_put_back(device):
    original = device.read_bytes()[6 * RS:6 * RS + 4]
    corrupt(device, 6 * RS, b"oops")
    assert scrub()["bad_regions"] == [[6, 1]]
    corrupt(device, 6 * RS, original)  # restored by hand
    report = api.scan_volume("vol")
    assert report["changed_regions"] == [] and report["cleared_regions"] == [[6, 1]]
    assert api.status("vol")[0]["bad_regions"] == []


def test_scan_never_clears_io_error_regions(device, monkeypatch):
    FlakyDevice.span = (9 * RS, 10 * RS)
    monkeypatch.setattr(Volume, "open_device",
                        lambda self, writable=False, path=None: FlakyDevice(path or self.record.device))
    assert scrub()["bad_regions"] == [[9, 1]]
    FlakyDevice.span = (0, 0)  # the device reads again, with changed bytes
    corrupt(device, 9 * RS)
    report = api.scan_volume("vol")
    assert report["changed_regions"] == []
    assert api.status("vol")[0]["bad_regions"] == [[9, 1]]


def test_init_refuses_unreadable_device(tmp_path, state_root, monkeypatch):
    path = tmp_path / "d.img"
    make_image(path, 4 * RS)
    FlakyDevice.span = (RS, RS + 1)
    monkeypatch.setattr(Volume, "open_device",
                        lambda self, writable=False, path=None: FlakyDevice(path or self.record.device))
    with pytest.raises(DeviceError, match="1 unreadable regions"):
        api.init_volume("vol", str(path), "64K")
    assert api.status() == []


def test_sparse_volume_digests_holes_as_zeros(tmp_path, state_root):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as handle:
        handle.truncate(64 * RS)
        handle.seek(10 * RS)
        handle.write(b"data")
    api.init_volume("sp", str(path), "64K")
    report = api.scrub_volume("sp")
    assert report["bad_regions"] == []
    from drtool.storage.reader import CHUNK

    assert report["bytes_scanned"] <= CHUNK  # only the chunk holding data is read
    corrupt(path, 50 * RS)  # fill a hole with a non-zero byte
    assert api.scrub_volume("sp")["bad_regions"] == [[50, 1]]


def test_scrub_without_recording_changes_nothing(device, state_root):
    corrupt(device, 6 * RS)
    report = api.scrub_volume("vol", record=False)
    assert report["bad_regions"] == [[6, 1]] and report["health"] == "DEGRADED"
    status = api.status("vol")[0]
    assert status["bad_regions"] == [] and status["last_scrub"] is None
    os.unlink(device)
    assert api.scrub_volume("vol", record=False)["health"] == "FAULTED"
    status = api.status("vol")[0]
    # status probes the device itself (health is current), but the record holds no fault
    assert status["health"] == "FAULTED" and status["faulted"]["since"] is None


def test_probe_and_remove(device, state_root):
    assert api.probe_volume("vol")["ok"] is True
    assert api.remove_volume("vol")["changed"] is True
    assert api.status() == []
    assert device.exists()  # the device itself is never touched


# -- a volume far larger than its data: costs follow the data --------------------------------

TIB = 1 << 40
EXTENTS = [(7 * RS + 10, b"a" * 100), (5_000_000 * RS - 50, b"b" * 200), (TIB - 3 * RS, os.urandom(3 * RS))]
EXTENT_REGIONS = [7, 4_999_999, 5_000_000, (TIB >> 16) - 3, (TIB >> 16) - 2, (TIB >> 16) - 1]


@pytest.fixture
def big(tmp_path, state_root):
    """A 1 TiB sparse file (16M regions) with three small data extents, registered."""
    path = tmp_path / "big.img"
    with open(path, "wb") as handle:
        handle.truncate(TIB)
        for offset, data in EXTENTS:
            handle.seek(offset)
            handle.write(data)
    report = api.init_volume("big", str(path), "64K")
    assert report["regions_total"] == TIB // RS
    return path


def test_init_of_a_sparse_tib_stores_only_the_data_regions(big, state_root):
    with Volume.inspect(str(state_root), "big") as vol:
        assert list(vol.manifest.nonzero_between(0, vol.geometry.count)) == EXTENT_REGIONS
        assert vol.manifest.is_zero(8) and vol.eras[7] == 0 and vol.eras[8] == 0


def test_scrub_of_a_sparse_tib_reads_only_its_data(big):
    report = api.scrub_volume("big")
    assert report["health"] == "ONLINE" and report["bad_regions"] == []
    assert report["bytes_scanned"] == len(EXTENT_REGIONS) * RS
    assert report["regions_scanned"] == report["regions_total"] == TIB // RS


def test_damage_in_a_sparse_tib_is_found(big, cli):
    corrupt(big, 5_000_000 * RS + 3)  # inside the data
    with Device(str(big), writable=True) as device:  # data lost to a hole: reads as zeros
        assert device.punch_hole(TIB - 2 * RS, RS)
    corrupt(big, 123_456 * RS + 9)  # a hole that should be zeros gets a byte
    result = cli("scrub", "big", "--json")
    assert result.code == 3
    report = result.json()
    assert report["bad_regions"] == [[123_456, 1], [5_000_000, 1], [(TIB >> 16) - 2, 1]]
    assert report["errors"]["checksum"] == 3
    # The data regions (the punched one reads as zeros) and the hole that gained data.
    assert report["bytes_scanned"] == (len(EXTENT_REGIONS) + 1) * RS


def test_scan_of_a_sparse_tib_accepts_only_what_changed(big, state_root):
    with Device(str(big), writable=True) as device:
        assert device.punch_hole(7 * RS, RS)  # the data of region 7 is discarded
    corrupt(big, 9_000_000 * RS, b"new")
    api.checkpoint("big")
    report = api.scan_volume("big")
    assert report["changed_regions"] == [[7, 1], [9_000_000, 1]]
    assert report["bytes_scanned"] == (len(EXTENT_REGIONS) + 1) * RS  # 7 is read: the manifest says data
    with Volume.inspect(str(state_root), "big") as vol:
        assert vol.manifest.is_zero(7) and vol.eras[7] == 2 and vol.eras[9_000_000] == 2
        assert list(vol.manifest.nonzero_between(0, vol.geometry.count)) == sorted(
            set(EXTENT_REGIONS) - {7} | {9_000_000})
    assert api.scrub_volume("big")["bad_regions"] == []


def test_a_faulted_sparse_tib_comes_back_online(big):
    """Every region is bad while the device is gone; they all verify again once it is back."""
    hidden = big.with_suffix(".away")
    big.rename(hidden)
    assert api.scrub_volume("big")["health"] == "FAULTED"
    assert api.status("big")[0]["bad_count"] == TIB // RS
    hidden.rename(big)
    report = api.scrub_volume("big")
    assert report["health"] == "ONLINE" and report["cleared_regions"] == [[0, TIB // RS]]
    assert report["bytes_scanned"] == len(EXTENT_REGIONS) * RS


def test_scan_clears_bad_hole_regions_without_reading_them(big, state_root):
    corrupt(big, 300 * RS)
    assert api.scrub_volume("big")["bad_regions"] == [[300, 1]]
    with Device(str(big), writable=True) as device:  # put back as it was: a hole
        assert device.punch_hole(300 * RS, RS)
    report = api.scan_volume("big")
    assert report["cleared_regions"] == [[300, 1]] and report["changed_regions"] == []
    assert report["bytes_scanned"] == len(EXTENT_REGIONS) * RS


def test_overlay_regions_are_neither_read_nor_judged(big, state_root):
    with Volume.open(str(state_root), "big") as vol:
        vol.overlay.set_run(4_999_990, 20)  # holds region 4_999_999 and 5_000_000
        vol.save_bitmaps()
    corrupt(big, 5_000_000 * RS)  # the device copy of an overlay region: not the device's to say
    corrupt(big, 7 * RS + 1)
    report = api.scrub_volume("big")
    assert report["bad_regions"] == [[7, 1]]
    assert report["skipped_overlay_regions"] == 20
    assert report["regions_scanned"] == TIB // RS - 20
    assert report["bytes_scanned"] == (len(EXTENT_REGIONS) - 2) * RS


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_run_arithmetic_matches_set_arithmetic(data):
    from drtool.detect import _minus, _RunSet, _runs_of, _union
    from drtool.regions import from_runs, to_runs

    regions = st.sets(st.integers(0, 120))
    a, b, c = data.draw(regions), data.draw(regions), data.draw(regions)
    assert list(_runs_of(sorted(a))) == to_runs(a)
    assert list(_union(to_runs(a), to_runs(b))) == to_runs(a | b)
    assert list(_minus(_union(to_runs(a), to_runs(b)), to_runs(c))) == to_runs((a | b) - c)
    collected = _RunSet()
    for first, count in data.draw(st.permutations(to_runs(a))):
        for region in data.draw(st.permutations(list(from_runs([(first, count)])))):
            collected.add(region)
    assert collected.runs() == to_runs(a)


# -- a real device failing reads at its ends (issue 11: the probe faulted the whole volume) ------

ENDS_SIZE = 16 * RS


@pytest.mark.slow
@pytest.mark.parametrize("spans, bad", [
    ([(0, 4096)], [[0, 1]]),
    ([(ENDS_SIZE - 4096, 4096)], [[15, 1]]),
    ([(0, 4096), (ENDS_SIZE - 4096, 4096)], [[0, 1], [15, 1]]),
], ids=["first-4k", "last-4k", "both"])
def test_eio_at_the_ends_marks_only_those_regions(tmp_path, state_root, faulty_device, cli, spans, bad):
    """EIO in the first and/or last 4 KiB (nbdkit's ddrescue filter under nbdfuse): the probe
    does not fault the volume; the scrub finds exactly those regions, as io-error; DEGRADED, exit 3."""
    image = tmp_path / "disk.img"
    make_image(image, ENDS_SIZE, seed=8)
    device = faulty_device(image)  # registered while it reads everywhere
    api.init_volume("vol", str(device.path), "64K")
    device.stop()
    device.start(spans)  # the same path now fails there
    found = api.probe_volume("vol")
    assert found["ok"] is True and found["state"] == "ok", found
    scrubbed = cli("scrub", "vol", "--json")
    assert scrubbed.code == 3, scrubbed.err
    report = scrubbed.json()
    assert report["health"] == "DEGRADED" and report["faulted"] is None
    assert report["bad_regions"] == bad
    assert report["errors"] == {"checksum": 0, "io-error": len(bad), "short-read": 0}
    assert report["regions_scanned"] == 16
    status = cli("status", "vol", "--json")
    assert status.json()["health"] == "DEGRADED" and status.json()["faulted"] is None
    assert status.json()["bad_regions"] == bad


@pytest.mark.slow
def test_a_device_failing_every_read_faults(tmp_path, state_root, faulty_device, cli):
    image = tmp_path / "disk.img"
    make_image(image, ENDS_SIZE, seed=8)
    device = faulty_device(image)
    api.init_volume("vol", str(device.path), "64K")
    device.stop()
    device.start([(0, ENDS_SIZE)])
    found = api.probe_volume("vol")
    assert found["ok"] is False and found["state"] == "unreadable"
    scrubbed = cli("scrub", "vol", "--json")
    assert scrubbed.code == 4, scrubbed.err
    assert scrubbed.json()["health"] == "FAULTED"
    assert "every read failed" in scrubbed.json()["faulted"]
