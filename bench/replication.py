"""Replication throughput: 1 GiB written through drtool's API, shipped and applied on a real
`drtool serve`, against curl reading the same number of bytes from the same server.

    .venv/bin/python bench/replication.py [--size 1G] [--runs 3]

For each run: a fresh protected volume (its initial sync is not timed), then 1 MiB writes
through Engine.write (logged, applied, digested) until --size is written, then
Replicator.ship() until the secondary acknowledged everything (verified, applied, fsync'd).
Reported: write rate, apply rate (bytes / shipping time), end-to-end rate (bytes / (write +
ship)), and curl's rate reading --size bytes with 64 MiB range GETs; ratio = apply / curl,
ratio_end_to_end = end-to-end / curl.  A durable apply is bounded by the disk, so each run is
also alternated with the disk's own durable write rate on the replica's directory (dd bs=4M
oflag=direct conv=fdatasync, --size bytes): disk_ratio = apply / dd, disk_ratio_end_to_end =
end-to-end / dd, medians of the per-run ratios.  wire_per_written = bytes the replicator sent
(records as shipped, headers included) / bytes written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_size, row, scratch_dir  # noqa: E402
from bench.remote_fetch import _start_server  # noqa: E402
from bench.replica_apply import dd_rate  # noqa: E402
from drtool import api  # noqa: E402
from drtool.client import ReplicaClient  # noqa: E402
from drtool.engine import Engine  # noqa: E402
from drtool.errors import VolumeNotFound  # noqa: E402
from drtool.replication import Replicator  # noqa: E402

CHUNK = 1 << 20


def _curl_rate(url: str, token: str, size: int) -> float:
    ranges = []
    step = 64 << 20
    for start in range(0, size, step):
        ranges += [f"{url}/v1/volumes/bench/data", "-r", f"{start}-{min(start + step, size) - 1}",
                   "-o", "/dev/null"]
    started = time.perf_counter()
    subprocess.run(["curl", "-sf", "-H", f"Authorization: Bearer {token}", *ranges], check=True)
    return size / (time.perf_counter() - started)


def one_run(work: str, size: int, url: str, token_file: str) -> dict[str, float]:
    root = os.path.join(work, "state")
    shutil.rmtree(root, ignore_errors=True)
    image = os.path.join(work, "primary.img")
    with open(image, "wb") as handle:
        handle.truncate(size)
    api.init_volume("bench", image, "64K", root=root, force=True)
    with ReplicaClient(url, token_file=token_file) as client:
        try:
            client.delete_volume("bench")  # the previous run's replica (another volume id)
        except VolumeNotFound:
            pass
    api.protect("bench", url, token_file, root=root)
    payload = os.urandom(CHUNK)
    with Engine.open(root, "bench") as engine:
        engine.record.settings["log_limit"] = 2 * size  # no bitmap mode: measure the log path
        replicator = Replicator(engine)
        started = time.perf_counter()
        for offset in range(0, size, CHUNK):
            engine.write(offset, payload)
        engine.flush()
        written = time.perf_counter()
        replicator.ship()
        shipped = time.perf_counter()
        assert not engine.volume.unreplicated.any()
    return {"write": size / (written - started), "apply": size / (shipped - written),
            "end_to_end": size / (shipped - started), "wire_per_written": replicator.shipped_bytes / size}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = scratch_dir("replication-")
    token_file = os.path.join(work, "token")
    with open(token_file, "w") as handle:
        handle.write(os.urandom(16).hex())
    os.chmod(token_file, 0o600)
    server, address = _start_server(os.path.join(work, "replica"), token_file)
    url = f"http://{address}"
    token = open(token_file).read().strip()
    try:
        runs = []
        curl = []
        for _ in range(args.runs):
            disk = dd_rate(os.path.join(work, "replica"), size)
            run = one_run(work, size, url, token_file)
            run["dd"] = disk
            runs.append(run)
            curl.append(_curl_rate(url, token, size))
        result = {key: median([r[key] for r in runs]) / 1e9 for key in ("write", "apply", "end_to_end", "dd")}
        result["curl"] = median(curl) / 1e9
        result["ratio"] = result["apply"] / result["curl"]
        result["ratio_end_to_end"] = result["end_to_end"] / result["curl"]
        result["disk_ratio"] = median([r["apply"] / r["dd"] for r in runs])
        result["disk_ratio_end_to_end"] = median([r["end_to_end"] / r["dd"] for r in runs])
        result["wire_per_written"] = median([r["wire_per_written"] for r in runs])
        result["bytes"] = size
        print(row("replication", f"{size >> 20} MiB", f"write {result['write']:.2f} GB/s",
                  f"apply {result['apply']:.2f} GB/s", f"end-to-end {result['end_to_end']:.2f} GB/s",
                  f"curl {result['curl']:.2f} GB/s", f"ratio {result['ratio']:.2f}",
                  f"end-to-end ratio {result['ratio_end_to_end']:.2f}",
                  f"dd {result['dd']:.2f} GB/s", f"apply/dd {result['disk_ratio']:.2f}",
                  f"end-to-end/dd {result['disk_ratio_end_to_end']:.2f}",
                  f"wire/written {result['wire_per_written']:.4f}"))
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
