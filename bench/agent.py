"""The read agent against nbdkit and qemu-nbd, healthy and degraded, and the recovery numbers.

    .venv/bin/python bench/agent.py [--size 2G] [--runs 5] [--fio-seconds 5] [--skip-sparse]

1. healthy: `drtool agent` (a real subprocess, verifying every region it reads) vs
   `nbdkit file` and `qemu-nbd` on the same warm 2 GiB image: nbdcopy to null: (medians of
   --runs, alternated) and fio randread 4k iodepth 32;
2. degraded: 10 % of the regions corrupted and the volume recovered before every run, so each
   full nbdcopy fetches them from a local `drtool serve` (verified, with copy-on-read and
   readahead as shipped); vs nbdkit on the healthy image; and the bytes fetched from the
   replica over the bytes of the bad regions;
3. time to recover: from `recover` (through the running agent's control socket) to the first
   verified read of a bad region, for a 1 GiB and a 16 GiB sparse volume.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_size, random_image, row, scratch_dir, warm  # noqa: E402
from bench.nbd_read import (  # noqa: E402
    Endpoint, _alternate, _process_cpu_seconds, compare, fio_run, nbdcopy_run, nbdkit_file, print_rows,
)
from bench.remote_fetch import _start_server  # noqa: E402
from drtool import api  # noqa: E402

RS = 64 * 1024
DRTOOL = [sys.executable, "-m", "drtool"]


@contextmanager
def agent(root: str, name: str, work: str) -> Iterator[Endpoint]:
    sock = os.path.join(work, f"{name}.agent.sock")
    env = {**os.environ, "DRTOOL_STATE_ROOT": root}
    proc = subprocess.Popen([*DRTOOL, "agent", name, "--nbd-socket", sock, "--listen", "none"],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(work, f"{name}.agent.log"), "ab"),
                            text=True, env=env)
    try:
        announce = proc.stdout.readline() + proc.stdout.readline()
        if "nbd+unix" not in announce:
            raise SystemExit(f"drtool agent did not start: {announce!r}")
        yield Endpoint(f"nbd+unix:///{name}?socket={sock}", lambda: _process_cpu_seconds(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _server(work: str) -> tuple[subprocess.Popen, str, str]:
    token = os.path.join(work, "token")
    with open(token, "w") as handle:
        handle.write(os.urandom(16).hex())
    os.chmod(token, 0o600)
    proc, address = _start_server(os.path.join(work, "replica"), token)
    return proc, f"http://{address}", token


def healthy(work: str, image: str, size: int, runs: int, fio_seconds: float) -> dict:
    root = os.path.join(work, "state-healthy")
    api.init_volume("healthy", image, "64K", root=root)
    warm(image)
    result = compare(image, size, runs, fio_seconds, {"drtool agent": lambda: agent(root, "healthy", work)})
    print_rows(result)
    return result


def small_regions(work: str, image: str, size: int, runs: int, fio_seconds: float) -> dict:
    """fio 4 KiB random reads on a volume registered with 4 KiB regions: each read verifies
    exactly the bytes it returns, instead of the 64 KiB region around them."""
    root = os.path.join(work, "state-4k")
    api.init_volume("small", image, "4K", root=root)
    warm(image)
    samples = _alternate({"drtool agent (4K regions)": lambda: agent(root, "small", work),
                          "nbdkit": lambda: nbdkit_file(image)}, runs,
                         lambda endpoint: fio_run(endpoint, size, fio_seconds))
    drtool, peer = samples["drtool agent (4K regions)"], samples["nbdkit"]
    result = {"drtool_iops": drtool[0], "nbdkit_iops": peer[0], "ratio": drtool[0] / peer[0],
              "drtool_cpu_us_per_io": drtool[1] * 1e6}
    print(row("fio randread 4k, 4K regions", f"drtool {drtool[0] / 1000:.1f} kIOPS",
              f"nbdkit {peer[0] / 1000:.1f} kIOPS", f"ratio {result['ratio']:.2f}",
              f"CPU {result['drtool_cpu_us_per_io']:.1f} µs/IO"))
    return result


def degraded(work: str, image: str, size: int, runs: int, url: str, token: str) -> dict:
    """Each run: 10 % of the regions corrupted, scrubbed, recovered; one full nbdcopy (timed: the
    first read fetches every bad region from the replica, verified, copy-on-read on); failback."""
    root = os.path.join(work, "state-degraded")
    damaged = os.path.join(work, "damaged.img")
    shutil.copyfile(image, damaged)
    api.init_volume("degraded", damaged, "64K", root=root)
    api.protect("degraded", url, token, root=root)
    regions = size // RS
    bad = random.Random(10).sample(range(regions), regions // 10)
    drtool_s, nbdkit_s, ratios = [], [], []
    with agent(root, "degraded", work) as endpoint, nbdkit_file(image) as peer:
        for _ in range(runs):
            with open(damaged, "r+b") as handle:
                for region in bad:
                    handle.seek(region * RS + 100)
                    handle.write(os.urandom(64))
            assert len(api.scrub_volume("degraded", root=root)["bad_regions"]) > 0
            api.recover("degraded", root=root)
            warm(damaged)
            drtool_s.append(nbdcopy_run(endpoint)[0])
            fetched = api.status("degraded", root=root, probe_peer=False)[0]["recovery"]["fetched_bytes"]
            ratios.append(fetched / (len(bad) * RS))
            api.failback("degraded", root=root)
            warm(image)
            nbdkit_s.append(nbdcopy_run(peer)[0])
    result = {
        "drtool_gbps": size / median(drtool_s) / 1e9,
        "nbdkit_gbps": size / median(nbdkit_s) / 1e9,
        "fetched_over_bad": max(ratios),
        "bad_regions": len(bad),
    }
    result["ratio"] = result["drtool_gbps"] / result["nbdkit_gbps"]
    print(row("degraded 10%", f"{size >> 20} MiB", f"drtool {result['drtool_gbps']:.2f} GB/s",
              f"nbdkit (healthy image) {result['nbdkit_gbps']:.2f} GB/s", f"ratio {result['ratio']:.2f}",
              f"fetched/bad bytes (worst run) {result['fetched_over_bad']:.3f}"))
    return result


def time_to_recover(work: str, size: int, url: str, token: str, runs: int) -> dict:
    """recover -> first verified read of a bad region, through a running agent."""
    name = f"sparse{size >> 30}g"
    root = os.path.join(work, f"state-{name}")
    device = os.path.join(work, f"{name}.img")
    with open(device, "wb") as handle:
        handle.truncate(size)
        for offset in range(0, size, 256 << 20):  # a little data in a sparse volume
            handle.seek(offset)
            handle.write(os.urandom(RS))
    api.init_volume(name, device, "64K", root=root)
    api.protect(name, url, token, root=root)
    target = (size // RS // 2 + 1) * RS  # a hole region in the middle
    samples = []
    with agent(root, name, work):
        for _ in range(runs):
            with open(device, "r+b") as handle:
                handle.seek(target)
                handle.write(b"garbage")
            api.scrub_volume(name, root=root)
            started = time.perf_counter()
            api.recover(name, root=root)
            data = api.read(name, target, 4096, root=root)
            samples.append(time.perf_counter() - started)
            assert data == bytes(4096), "the read must be the replica's verified zeros"
            api.failback(name, root=root)
    result = {"size": size, "seconds": median(samples), "max_seconds": max(samples)}
    print(row("time to recover", f"{size >> 30} GiB sparse", f"median {result['seconds'] * 1000:.0f} ms",
              f"max {result['max_seconds'] * 1000:.0f} ms", f"runs {runs}"))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument("--skip-sparse", action="store_true", help="skip the 16 GiB time-to-recover run")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = scratch_dir("agent-")
    server, url, token = _server(work)
    try:
        image = os.path.join(work, "random.img")
        random_image(image, size)
        out = {"healthy": healthy(work, image, size, args.runs, args.fio_seconds),
               "small_regions": small_regions(work, image, size, max(1, args.runs // 2), args.fio_seconds),
               "degraded": degraded(work, image, size, args.runs, url, token),
               "recover_1g": time_to_recover(work, 1 << 30, url, token, 3)}
        if not args.skip_sparse:
            out["recover_16g"] = time_to_recover(work, 16 << 30, url, token, 3)
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
