"""Remote fetch: drtool's verified batched read against curl's plain range GETs.

Starts a local ``drtool serve``, fills a replica with random data (64 KiB
regions), then alternates (a) ReplicaClient.read_regions over every region,
verifying each against the expected digests, and (b) curl reading the same
bytes with plain 64 MiB range GETs to /dev/null (one curl process, one
keep-alive connection).  Prints the medians; ratio = drtool / curl.

    .venv/bin/python bench/remote_fetch.py [--size 1G] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import blake3

from drtool import wire
from drtool.client import ReplicaClient
from drtool.units import parse_size

VOLUME_ID = "b" * 32


def _start_server(root: str, token_file: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "drtool", "serve", "--root", root, "--listen", "127.0.0.1:0",
                             "--token-file", token_file], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    prefix = "drtool replica server listening on "
    if not line.startswith(prefix):
        proc.kill()
        raise SystemExit(f"drtool serve did not start: {line!r}")
    return proc, line[len(prefix):].strip()


def _fill(client: ReplicaClient, size: int, region_size: int) -> list[bytes]:
    """Random content, shipped as one record per region; returns each region's digest."""
    rng = random.Random(42)
    digests: list[bytes] = []
    batch = 64 << 20
    seq = 0
    for start in range(0, size, batch):
        data = rng.randbytes(min(batch, size - start))
        chunks: list[bytes | memoryview] = []
        view = memoryview(data)
        for offset in range(0, len(data), region_size):
            piece = view[offset:offset + region_size]
            digest = blake3.blake3(piece).digest()
            digests.append(digest)
            seq += 1
            chunks += [wire.encode_record_header(wire.KIND_WRITE, seq, start + offset, len(piece), 0, digest),
                       piece]
        client.send_records("bench", chunks, complete_through=seq)
    return digests


def _drtool_read(client: ReplicaClient, count: int, digests: list[bytes]) -> int:
    received = 0
    for result in client.read_regions("bench", [(0, count)], expected=digests.__getitem__):
        if not result.ok:
            raise SystemExit(f"region {result.region} failed verification: {result.reason}")
        received += len(result.data)  # type: ignore[arg-type]
    return received


def _curl_read(url: str, token: str, size: int, range_size: int) -> None:
    command = ["curl", "-sf"]
    for start in range(0, size, range_size):
        end = min(start + range_size, size) - 1
        if start:
            command.append("--next")
        command += ["-H", f"Authorization: Bearer {token}", "-r", f"{start}-{end}", "-o", "/dev/null",
                    f"{url}/v1/volumes/bench/data"]
    subprocess.run(command, check=True)


def _server_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--region-size", default="64K")
    parser.add_argument("--range-size", default="64M", help="bytes per curl range GET")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the comparison")
    size, region_size = parse_size(args.size), parse_size(args.region_size)
    count = (size + region_size - 1) // region_size
    workdir = tempfile.mkdtemp(prefix="drtool-bench-")
    token = secrets.token_hex(16)
    token_file = os.path.join(workdir, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
        handle.write(token)
    proc, address = _start_server(os.path.join(workdir, "root"), token_file)
    url = f"http://{address}"
    try:
        with ReplicaClient(url, token=token, timeout=(5, 120)) as client:
            client.ensure_volume("bench", size, region_size, VOLUME_ID)
            digests = _fill(client, size, region_size)
            drtool_times, curl_times = [], []
            # CPU seconds (server, reader) per run: on a small machine the two
            # processes share the cores, so CPU per byte explains the wall times.
            drtool_cpu, curl_cpu = [], []
            for _ in range(args.runs):
                server, reader, started = _server_cpu(proc.pid), _cpu(resource.RUSAGE_SELF), time.perf_counter()
                if _drtool_read(client, count, digests) != size:
                    raise SystemExit("drtool read returned the wrong number of bytes")
                drtool_times.append(time.perf_counter() - started)
                drtool_cpu.append((_server_cpu(proc.pid) - server, _cpu(resource.RUSAGE_SELF) - reader))
                server, reader, started = _server_cpu(proc.pid), _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
                _curl_read(url, token, size, parse_size(args.range_size))
                curl_times.append(time.perf_counter() - started)
                curl_cpu.append((_server_cpu(proc.pid) - server, _cpu(resource.RUSAGE_CHILDREN) - reader))
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
    drtool_gbs = size / statistics.median(drtool_times) / 1e9
    curl_gbs = size / statistics.median(curl_times) / 1e9
    result = {"bytes": size, "region_size": region_size, "runs": args.runs,
              "drtool_gb_s": round(drtool_gbs, 3), "curl_gb_s": round(curl_gbs, 3),
              "ratio": round(drtool_gbs / curl_gbs, 3),
              "drtool_seconds": [round(t, 4) for t in drtool_times],
              "curl_seconds": [round(t, 4) for t in curl_times],
              "cpu_s_per_gib": {
                  "drtool_server": _per_gib(drtool_cpu, 0, size), "drtool_client": _per_gib(drtool_cpu, 1, size),
                  "curl_server": _per_gib(curl_cpu, 0, size), "curl_client": _per_gib(curl_cpu, 1, size)}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'bytes':>12} {'drtool GB/s':>12} {'curl GB/s':>10} {'ratio':>6}")
        print(f"{size:>12} {drtool_gbs:>12.2f} {curl_gbs:>10.2f} {result['ratio']:>6.2f}")
        cpu = result["cpu_s_per_gib"]
        print(f"CPU s/GiB (server + reader): drtool {cpu['drtool_server']} + {cpu['drtool_client']}, "
              f"curl {cpu['curl_server']} + {cpu['curl_client']}")
    return result


def _per_gib(samples: list[tuple[float, float]], index: int, size: int) -> float:
    return round(statistics.median(s[index] for s in samples) * (1 << 30) / size, 3)


if __name__ == "__main__":
    main()
