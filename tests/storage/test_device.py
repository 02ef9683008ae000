"""Devices: regular files and block devices, refusals, I/O errors by range."""

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
