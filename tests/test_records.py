"""volume.json's sub-records: typed, checked field by field, the same JSON shape as before."""

import json

import pytest

from drtool.errors import CorruptStateFile
from drtool.storage.record import VolumeRecord, record_checksum
from drtool.storage.records import Demoted, Failback, Faulted, Loss, Promoted, Recovery, Replication

RECOVERY = {"entered": 1.5, "reason": "operator ran recover", "auto": False, "local_era": None,
            "source": "mirror", "era": 3, "fetched_regions": 2, "fetched_bytes": 131072}
FAILBACK = {"started": 2.0, "device": "/dev/sdc", "total_regions": 8, "done_regions": 2,
            "bytes_copied": 131072, "finished": None}
DEMOTED = {"time": 3.0, "era": 4, "seq": 17, "peer": "https://b:8470", "forced": True,
           "lost": {"records": 2, "bytes": 8192, "regions": 2, "exact": True, "after_seq": 15},
           "divergent": [[3, 2]], "adopted": {"url": "https://a:8470", "time": 4.0}}
PROMOTED = {"time": 5.0, "era": 5, "applied_seq": 15, "forced": False, "takeover": False,
            "released": {"state": "released", "era": 4, "seq": 15, "at": 3.5}, "last_record_at": 3.4,
            "lost": None, "overlay_regions_merged": 0}
REPLICATION = {"initial_sync": "done", "started": 1.0, "mode": "full", "regions": 64, "finished": 2.0,
               "acked_through": 12, "acked_ahead": [14], "overflows": 1, "bitmap_mode_since": 1.7}


@pytest.mark.parametrize("kind, data", [
    (Recovery, RECOVERY), (Failback, FAILBACK), (Demoted, DEMOTED), (Promoted, PROMOTED),
    (Replication, REPLICATION), (Replication, {}), (Faulted, {"reason": "gone", "since": 9.0}),
    (Loss, {"records": 0, "bytes": 0, "regions": 0}),
])
def test_round_trip_keeps_the_json_shape(kind, data):
    assert kind.from_json(data).to_json() == data


@pytest.mark.parametrize("kind, data, field", [
    (Recovery, {**RECOVERY, "era": "3"}, "recovery.era"),
    (Recovery, {**RECOVERY, "auto": 1}, "recovery.auto"),
    (Recovery, {**RECOVERY, "source": "tape"}, "recovery.source"),
    (Recovery, {k: v for k, v in RECOVERY.items() if k != "reason"}, "recovery.reason"),
    (Failback, {**FAILBACK, "done_regions": True}, "failback.done_regions"),
    (Demoted, {**DEMOTED, "lost": {"records": 1}}, "demoted.lost.bytes"),
    (Demoted, {**DEMOTED, "divergent": [[1, "x"]]}, "demoted.divergent[0][1]"),
    (Demoted, {**DEMOTED, "adopted": "yes"}, "demoted.adopted"),
    (Promoted, {**PROMOTED, "released": [1]}, "promoted.released"),
    (Replication, {"acked_ahead": 3}, "replication.acked_ahead"),
    (Faulted, "gone", "faulted"),
])
def test_malformed_sub_records_are_refused_naming_the_field(kind, data, field):
    with pytest.raises(CorruptStateFile) as caught:
        kind.from_json(data, kind.__name__.lower())
    assert field in str(caught.value)


def test_a_volume_record_with_a_malformed_sub_record_is_refused(tmp_path):
    path = tmp_path / "volume.json"
    record = VolumeRecord.new("vol", "/dev/sdb", 1 << 20, 65536)
    record.recovery = Recovery(entered=1.0, reason="r", auto=True, local_era=None, source="mirror", era=2)
    record.save(str(path))
    assert VolumeRecord.load(str(path)) == record
    data = json.loads(path.read_text())
    data["recovery"]["fetched_bytes"] = "lots"
    data["checksum"] = record_checksum(data)  # a well-formed file with a wrong field
    path.write_text(json.dumps(data))
    with pytest.raises(CorruptStateFile, match="recovery.fetched_bytes"):
        VolumeRecord.load(str(path))


def test_assigning_json_checks_and_types_it():
    record = VolumeRecord.new("vol", "/dev/sdb", 1 << 20, 65536)
    record.faulted = {"reason": "gone", "since": 1}
    assert record.faulted == Faulted("gone", 1.0)
    assert record.faulted.get("since") == 1.0 and record.faulted["reason"] == "gone"
    with pytest.raises(CorruptStateFile, match="faulted.since"):
        record.faulted = {"reason": "gone", "since": None}
    record.replication = None
    assert record.replication == Replication() and record.to_json()["replication"] == {}
