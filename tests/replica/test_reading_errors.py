"""A mirror region the secondary cannot read becomes an ERROR frame; its neighbours still go out."""

from drtool.buffers import aligned_bytes
from drtool.errors import DeviceIOError
from drtool.regions import Geometry
from drtool.replica.reading import _read_run
from drtool.storage.device import Device
from drtool.wire import FRAME_DATA, FRAME_ERROR, decode_frame_header
from tests.conftest import make_image

RS = 65536


class FailingDevice(Device):
    bad = (RS, 2 * RS)

    def readinto(self, buffer, offset):
        if offset < self.bad[1] and offset + len(buffer) > self.bad[0]:
            raise DeviceIOError(self.path, offset, len(buffer), "I/O error (EIO)")
        super().readinto(buffer, offset)


class Digests:
    def digest(self, region: int) -> bytes:
        return bytes([region]) * 32


def test_unreadable_region_becomes_an_error_frame(tmp_path):
    data = make_image(tmp_path / "mirror.img", 3 * RS)
    geometry = Geometry(3 * RS, RS)
    buffer = aligned_bytes(3 * RS)
    views = []
    members = []
    for region in range(3):
        members.append((region, Digests(), len(views)))
        views += [b"", buffer[region * RS:(region + 1) * RS]]
    with FailingDevice(str(tmp_path / "mirror.img")) as device:
        _read_run(geometry, device, 0, buffer, 0, members, views)
    kinds = [decode_frame_header(views[2 * r]).kind for r in range(3)]
    assert kinds == [FRAME_DATA, FRAME_ERROR, FRAME_DATA]
    assert bytes(views[1]) == data[:RS] and bytes(views[5]) == data[2 * RS:]
    assert b"I/O error" in bytes(views[3])
    assert decode_frame_header(views[0]).digest == bytes([0]) * 32
