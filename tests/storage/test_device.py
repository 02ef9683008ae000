"""Devices: regular files and block devices, refusals, I/O errors by range."""

import os
import subprocess

import pytest

from drtool.errors import DeviceError, DeviceIOError, UsageError
from drtool.storage.device import Device, check_device_path, probe
from tests.conftest import IN_CI, make_image, require_root, require_tool


def test_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        check_device_path(str(tmp_path))


def test_missing_device(tmp_path):
    with pytest.raises(DeviceError, match="does not exist"):
        check_device_path(str(tmp_path / "nope"))
    assert probe(str(tmp_path / "nope")).state == "missing"


def test_short_read_names_the_range(tmp_path):
    make_image(tmp_path / "d.img", 1000)
    with Device(str(tmp_path / "d.img")) as dev:
        with pytest.raises(DeviceIOError, match="short read") as info:
            dev.readinto(bytearray(100), 950)
        assert info.value.offset == 1000


def test_probe_reports_wrong_size(tmp_path):
    make_image(tmp_path / "d.img", 1000)
    assert probe(str(tmp_path / "d.img"), expected_size=2000).state == "wrong-size"
    assert probe(str(tmp_path / "d.img"), expected_size=1000).ok


def test_hole_detection(tmp_path):
    path = tmp_path / "sparse.img"
    with open(path, "wb") as handle:
        handle.truncate(1 << 20)
        handle.seek(512 * 1024)
        handle.write(b"x" * 4096)
    with Device(str(path)) as dev:
        assert dev.is_hole(0, 256 * 1024)
        assert not dev.is_hole(256 * 1024, 512 * 1024)


def test_block_device_size_from_ioctl(tmp_path):
    require_root()
    require_tool("losetup")
    make_image(tmp_path / "loop.img", 4 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", str(tmp_path / "loop.img")],
                          capture_output=True, text=True)
    if loop.returncode != 0:
        (pytest.fail if IN_CI else pytest.skip)(f"no loop devices here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        assert check_device_path(device) == 4 << 20
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# -- the probe: what faults a volume (issue 11: EIO at either end faulted it) ---------------------

def fail_reads_in(monkeypatch, *spans):
    """Device reads touching any of ``spans`` (offset, length) fail with EIO."""
    real = Device.readinto

    def readinto(self, buffer, offset):
        for start, length in spans:
            if offset < start + length and offset + len(buffer) > start:
                raise DeviceIOError(self.path, offset, len(buffer), "I/O error (EIO)")
        real(self, buffer, offset)

    monkeypatch.setattr(Device, "readinto", readinto)


SIZE = 40 * 65536 + 1000


@pytest.mark.parametrize("spans, failed", [
    ([(0, 4096)], [(0, 4096)]),
    ([(SIZE - 1000, 1000)], [(SIZE - 1000, 1000)]),
    ([(0, 4096), (SIZE - 5000, 5000)], [(0, 4096), (40 * 65536, 1000)]),
    ([(0, 1), (SIZE - 1, 1)], [(0, 4096), (40 * 65536, 1000)]),
])
def test_probe_read_errors_at_the_ends_do_not_fault(tmp_path, monkeypatch, spans, failed):
    make_image(tmp_path / "d.img", SIZE)
    fail_reads_in(monkeypatch, *spans)
    found = probe(str(tmp_path / "d.img"), expected_size=SIZE)
    assert found.ok and found.state == "ok" and found.size == SIZE
    assert list(found.read_errors) == failed
    assert "0 (+4096)" in found.reason or str(40 * 65536) in found.reason


def test_probe_faults_a_device_that_fails_every_read(tmp_path, monkeypatch):
    make_image(tmp_path / "d.img", SIZE)
    fail_reads_in(monkeypatch, (0, SIZE))
    found = probe(str(tmp_path / "d.img"), expected_size=SIZE)
    assert not found.ok and found.state == "unreadable"
    assert "every read failed (8 blocks tried" in found.reason
    assert len(found.read_errors) == 8


def test_probe_reads_the_middle_only_when_both_ends_fail(tmp_path, monkeypatch):
    make_image(tmp_path / "d.img", SIZE)
    reads = []
    real = Device.readinto
    monkeypatch.setattr(Device, "readinto",
                        lambda self, buf, off: (reads.append((off, len(buf))), real(self, buf, off)))
    assert probe(str(tmp_path / "d.img"), expected_size=SIZE).read_errors == ()
    assert reads == [(0, 4096), (40 * 65536, 1000)]
    # Both ends fail, and so does the first sample: the second one reads, the device is usable.
    reads.clear()
    fail_reads_in(monkeypatch, (0, 4096), (SIZE - 1000, 1000), (376832, 1))
    found = probe(str(tmp_path / "d.img"), expected_size=SIZE)
    assert found.ok and found.read_errors == ((0, 4096), (40 * 65536, 1000), (376832, 4096))


def test_probe_faults(tmp_path, monkeypatch):
    """FAULTED: missing, not a device, smaller than the volume, cannot be opened."""
    make_image(tmp_path / "d.img", 1000)
    assert probe(str(tmp_path / "nope")).state == "missing"
    assert probe(str(tmp_path)).state == "not-a-device"
    assert probe(str(tmp_path / "d.img"), expected_size=1001).state == "wrong-size"
    assert probe(str(tmp_path / "d.img"), expected_size=999).ok  # a larger device is fine
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path) == str(tmp_path / "d.img"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)  # even root cannot open it
    found = probe(str(tmp_path / "d.img"), expected_size=1000)
    assert found.state == "unreadable" and "Permission denied" in found.reason
