"""The agent's write path against nbdkit: fio random 4 KiB writes with a flush every 32.

    .venv/bin/python bench/writes.py [--size 1G] [--runs 3] [--fio-seconds 10] [--rows protected,...]

Rows (each alternated with its peer, ``--runs`` rounds, medians; a fresh copy of a random image
for each server):

``protected``
    ``drtool agent`` on a volume protected by a local ``drtool serve`` (the agent logs, writes,
    updates its maps and ships every record to the replica while fio runs) against ``nbdkit
    file`` on a copy of the same image.
``unprotected``
    the same volume without a peer (log, write, maps; no shipping) against ``nbdkit file``.
``degraded``
    10 % of the regions corrupted, scrubbed and recovered before each run, so every write goes
    to the overlay (and is shipped to the overlay replica), against drtool's own normal-mode
    writes (a second protected volume, in the same rounds: the fair target, >= 0.8x) and
    ``nbdkit --filter=cow file`` (a fresh process each run: its overlay is a temporary file, no
    durability: a bound, not a fair peer).  The agent fails back after each run.
``wire``
    bytes shipped by replication for the bytes fio wrote (``--wire-ios`` writes, then
    ``drtool replicate --wait``), counted by a byte-counting TCP relay between the agent and
    ``drtool serve``, in normal and in degraded mode.  HTTP headers and record headers (76
    bytes per record) are counted too: 1.0 is each byte crossing the wire once.

fio: ``--ioengine=nbd --rw=randwrite --bs=4k --iodepth=32 --fsync=32``, time based.  Each row
reports IOPS and the server's CPU (utime + stime of all its threads) per I/O.

Before and after in one run: ``--rev REV`` adds REV's drtool (``git archive`` of its package,
registered and served by its own ``drtool init``/``protect``/``agent``, as bench/agent.py's
A/B does) beside this checkout's, both alternated with the peer in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.agent import DRTOOL, _env, agent, source_tree  # noqa: E402
from bench.common import median, parse_size, random_image, row, scratch_dir  # noqa: E402
from bench.nbd_read import Endpoint, _peer_server  # noqa: E402
from bench.remote_fetch import _start_server  # noqa: E402

RS = 64 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("protected", "unprotected", "degraded", "wire")


def fio_write(endpoint: Endpoint, size: int, seconds: float | None = None, ios: int | None = None,
              seed: int = 1) -> dict:
    """fio random 4 KiB writes, 32 in flight, a flush every 32 writes: IOPS, CPU µs per I/O of
    the server, bytes written."""
    cpu = endpoint.cpu_seconds()
    limit = ([f"--runtime={seconds}", "--time_based"] if ios is None else [f"--number_ios={ios}"])
    result = subprocess.run(
        ["fio", "--name=randwrite", "--ioengine=nbd", f"--uri={endpoint.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=32", "--fsync=32", f"--size={size}", f"--randseed={seed}", *limit,
         "--output-format=json"],
        check=True, capture_output=True, text=True)
    used = endpoint.cpu_seconds() - cpu
    report = json.loads(result.stdout[result.stdout.index("{"):])
    job = report["jobs"][0]["write"]
    return {"iops": job["iops"], "cpu_us_per_io": used / max(1, job["total_ios"]) * 1e6,
            "bytes": job["io_bytes"], "ios": job["total_ios"]}


def nbdkit_rw(image: str, cow: bool = False) -> AbstractContextManager[Endpoint]:
    socket_path = f"{image}.nbdkit{'-cow' if cow else ''}.sock"
    command = ["nbdkit", "-f", "-U", socket_path, *(["--filter=cow"] if cow else []), "file", image]
    return _peer_server(command, socket_path, f"nbd+unix:///?socket={socket_path}")


class CountingRelay:
    """A TCP relay that counts the bytes its clients send (the agent's requests to the replica
    server, bodies and HTTP headers alike)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 20)
                if not data:
                    break
                if count:
                    with self.lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


class Bench:
    def __init__(self, work: str, image: str, size: int) -> None:
        self.work = work
        self.image = image
        self.size = size
        token = os.path.join(work, "token")
        with open(token, "w") as handle:
            handle.write(os.urandom(16).hex())
        os.chmod(token, 0o600)
        self.token = token
        self.server, address = _start_server(os.path.join(work, "replica"), token)
        host, port = address.rsplit(":", 1)
        self.relay = CountingRelay((host, int(port)))
        self.url = f"http://{self.relay.address[0]}:{self.relay.address[1]}"
        self._volumes = 0
        self.region_size = "64K"  # --region-size

    def close(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=30)
        self.relay.close()

    def volume(self, protect: bool, source: str = REPO) -> tuple[str, str]:
        """A fresh volume on a copy of the image, registered (and protected) by the drtool in
        ``source``: (state root, name)."""
        self._volumes += 1
        name = f"w{self._volumes}"
        device = os.path.join(self.work, f"{name}.img")
        shutil.copyfile(self.image, device)
        root = os.path.join(self.work, f"state-{name}")
        env = _env(root, source)
        quiet = {"env": env, "cwd": self.work, "check": True, "stdout": subprocess.DEVNULL}
        subprocess.run([*DRTOOL, "init", name, "--device", device, "--region-size", self.region_size], **quiet)
        if protect:
            subprocess.run([*DRTOOL, "protect", name, "--peer", self.url, "--token-file", self.token], **quiet)
        return root, name

    def drop(self, root: str, name: str) -> None:
        """A row is done with this volume: its device, its state and its replica go (each
        volume is a copy of the image: a run of every row would otherwise fill the disk)."""
        from drtool.client import ReplicaClient
        from drtool.errors import VolumeNotFound

        os.unlink(os.path.join(self.work, f"{name}.img"))
        shutil.rmtree(root, ignore_errors=True)
        with ReplicaClient(self.url, token_file=self.token) as client:
            try:
                client.delete_volume(name)
            except VolumeNotFound:
                pass

    def peer_image(self) -> str:
        path = os.path.join(self.work, "peer.img")
        shutil.copyfile(self.image, path)
        return path

    def corrupt(self, root: str, name: str, source: str = REPO) -> None:
        """10 % of the regions corrupted on the device, found by a scrub, and the volume
        recovered (degraded: every later write goes to the overlay)."""
        device = os.path.join(self.work, f"{name}.img")
        regions = self.size // RS
        bad = random.Random(10).sample(range(regions), regions // 10)
        with open(device, "r+b") as handle:
            for region in bad:
                handle.seek(region * RS + 100)
                handle.write(os.urandom(64))
        env = _env(root, source)
        scrub = subprocess.run([*DRTOOL, "scrub", name, "--json"], env=env, cwd=self.work,
                               capture_output=True, text=True)
        # exit 3: the volume has bad regions (drtool.errors.ExitCode.BAD_REGIONS), as it must now
        assert scrub.returncode == 3 and json.loads(scrub.stdout)["bad_regions"], scrub.stderr
        subprocess.run([*DRTOOL, "recover", name], env=env, cwd=self.work, check=True, stdout=subprocess.DEVNULL)


def _summary(samples: list[dict]) -> dict:
    return {"iops": median([s["iops"] for s in samples]),
            "iops_min": min(s["iops"] for s in samples), "iops_max": max(s["iops"] for s in samples),
            "cpu_us_per_io": median([s["cpu_us_per_io"] for s in samples]), "samples": samples}


def _print(row_label: str, result: dict, peer_label: str) -> None:
    peer = result[peer_label]
    for label, entry in result.items():
        if not isinstance(entry, dict) or "iops" not in entry:
            continue
        ratio = "" if label == peer_label else f"ratio {entry['iops'] / peer['iops']:.2f}"
        print(row(row_label, label, f"{entry['iops'] / 1000:.2f} kIOPS ({entry['iops_min'] / 1000:.2f}-"
                                    f"{entry['iops_max'] / 1000:.2f})", ratio,
                  f"CPU {entry['cpu_us_per_io']:.0f} µs/IO"), flush=True)


def _rounds(runs: int, steps: list[Callable[[int], None]]) -> None:
    """``runs`` rounds over ``steps``, the order reversed every other round."""
    for run in range(runs):
        for step in (steps if run % 2 == 0 else steps[::-1]):
            step(run)


def normal_row(bench: Bench, protect: bool, runs: int, seconds: float, versions: dict[str, str]) -> dict:
    peer_image = bench.peer_image()
    samples: dict[str, list[dict]] = {label: [] for label in [*versions, "nbdkit"]}
    with ExitStack() as stack:
        endpoints: dict[str, Endpoint] = {}
        volumes: dict[str, tuple[str, str]] = {}
        for label, source in versions.items():
            volumes[label] = bench.volume(protect, source)
            endpoints[label] = stack.enter_context(agent(*volumes[label], bench.work, source))
        endpoints["nbdkit"] = stack.enter_context(nbdkit_rw(peer_image))

        def step(label: str) -> Callable[[int], None]:
            def run(number: int) -> None:
                samples[label].append(fio_write(endpoints[label], bench.size, seconds, seed=number + 1))
                if protect and label in versions:
                    root, name = volumes[label]
                    subprocess.run([*DRTOOL, "replicate", name, "--wait"], env=_env(root, versions[label]),
                                   cwd=bench.work, check=True, stdout=subprocess.DEVNULL)  # no lag left
            return run
        _rounds(runs, [step(label) for label in samples])
    for volume in volumes.values():
        bench.drop(*volume)
    os.unlink(peer_image)
    result: dict = {label: _summary(values) for label, values in samples.items()}
    result.update(runs=runs, seconds=seconds)
    for label in versions:
        result[label]["ratio"] = result[label]["iops"] / result["nbdkit"]["iops"]
    _print("randwrite 4k qd32 fsync 32, " + ("protected" if protect else "not protected"), result, "nbdkit")
    return result


def degraded_row(bench: Bench, runs: int, seconds: float, versions: dict[str, str]) -> dict:
    """Degraded writes against drtool's own normal-mode writes (issue 12's target: >= 0.8x) and
    against nbdkit's cow filter, all alternated in the same rounds."""
    peer_image = bench.peer_image()
    normal = {f"{label}, normal mode": source for label, source in versions.items()}
    samples: dict[str, list[dict]] = {label: [] for label in [*versions, *normal, "nbdkit --filter=cow"]}
    with ExitStack() as stack:
        endpoints: dict[str, Endpoint] = {}
        volumes: dict[str, tuple[str, str]] = {}
        for label, source in {**versions, **normal}.items():
            volumes[label] = bench.volume(True, source)
            endpoints[label] = stack.enter_context(agent(*volumes[label], bench.work, source))

        def ours(label: str) -> Callable[[int], None]:
            def run(number: int) -> None:
                root, name = volumes[label]
                bench.corrupt(root, name, versions[label])
                samples[label].append(fio_write(endpoints[label], bench.size, seconds, seed=number + 1))
                subprocess.run([*DRTOOL, "failback", name], env=_env(root, versions[label]), cwd=bench.work,
                               check=True, stdout=subprocess.DEVNULL)
            return run

        def ours_normal(label: str) -> Callable[[int], None]:
            def run(number: int) -> None:
                root, name = volumes[label]
                samples[label].append(fio_write(endpoints[label], bench.size, seconds, seed=number + 1))
                subprocess.run([*DRTOOL, "replicate", name, "--wait"], env=_env(root, normal[label]),
                               cwd=bench.work, check=True, stdout=subprocess.DEVNULL)  # no lag left
            return run

        def theirs(number: int) -> None:
            with nbdkit_rw(peer_image, cow=True) as cow:
                samples["nbdkit --filter=cow"].append(fio_write(cow, bench.size, seconds, seed=number + 1))
        steps = []
        for label in versions:
            steps += [ours(label), ours_normal(f"{label}, normal mode")]
        _rounds(runs, [*steps, theirs])
    for volume in volumes.values():
        bench.drop(*volume)
    os.unlink(peer_image)
    result: dict = {label: _summary(values) for label, values in samples.items()}
    result.update(runs=runs, seconds=seconds)
    for label in versions:
        result[label]["ratio"] = result[label]["iops"] / result["nbdkit --filter=cow"]["iops"]
        result[label]["ratio_to_normal"] = result[label]["iops"] / result[f"{label}, normal mode"]["iops"]
    _print("randwrite 4k qd32 fsync 32, degraded (10 % bad)", result, "nbdkit --filter=cow")
    for label in versions:
        print(row("randwrite 4k qd32 fsync 32, degraded / normal mode", label,
                  f"ratio {result[label]['ratio_to_normal']:.2f}"), flush=True)
    return result


def wire_row(bench: Bench, ios: int, label: str, source: str) -> dict:
    """Bytes on the wire for the bytes written: normal mode, then degraded mode."""
    root, name = bench.volume(True, source)
    out = {}
    with agent(root, name, bench.work, source) as endpoint:
        for mode in ("normal", "degraded"):
            if mode == "degraded":
                bench.corrupt(root, name, source)
            replicate = [*DRTOOL, "replicate", name, "--wait"]
            subprocess.run(replicate, env=_env(root, source), cwd=bench.work, check=True, stdout=subprocess.DEVNULL)
            before = bench.relay.sent
            written = fio_write(endpoint, bench.size, ios=ios, seed=7)["bytes"]
            subprocess.run(replicate, env=_env(root, source), cwd=bench.work, check=True, stdout=subprocess.DEVNULL)
            shipped = bench.relay.sent - before
            out[mode] = {"written": written, "shipped": shipped, "ratio": shipped / written}
            print(row(f"wire bytes / written bytes, {mode}", label, f"{ios} writes of 4 KiB",
                      f"written {written / 1e6:.1f} MB", f"shipped {shipped / 1e6:.1f} MB",
                      f"ratio {shipped / written:.3f}"), flush=True)
    bench.drop(root, name)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fio-seconds", type=float, default=10.0)
    parser.add_argument("--wire-ios", type=int, default=20000)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--rev", help="also run this commit's drtool, alternated with the checkout's")
    parser.add_argument("--region-size", default="64K",
                        help="the volumes' region size (default %(default)s; 4K shows what the 64 KiB base costs)")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    missing = [tool for tool in ("fio", "nbdkit") if shutil.which(tool) is None]
    if missing:
        parser.error(f"missing tools: {', '.join(missing)}")
    size = parse_size(args.size)
    work = scratch_dir("writes-")
    image = os.path.join(work, "random.img")
    random_image(image, size)
    bench = Bench(work, image, size)
    bench.region_size = args.region_size
    versions = {"drtool": REPO}
    trees = []
    if args.rev:
        old_source, old_sha = source_tree(args.rev)
        trees.append(old_source)
        versions = {f"drtool {old_sha} (before)": old_source, "drtool (checkout)": REPO}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"writes {started}: {size >> 20} MiB, {args.region_size} regions, {args.runs} runs of {args.fio_seconds:g} s; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    out: dict = {"date": started, "size": size}
    try:
        plan: dict[str, Callable[[], dict]] = {
            "protected": lambda: normal_row(bench, True, args.runs, args.fio_seconds, versions),
            "unprotected": lambda: normal_row(bench, False, args.runs, args.fio_seconds, versions),
            "degraded": lambda: degraded_row(bench, args.runs, args.fio_seconds, versions),
            "wire": lambda: {label: wire_row(bench, args.wire_ios, label, source)
                             for label, source in versions.items()},
        }
        for name in rows:
            out[name] = plan[name]()
        out["load_average_end"] = os.getloadavg()[0]
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(out, handle, indent=2)
        return out
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
        for tree in trees:
            shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
