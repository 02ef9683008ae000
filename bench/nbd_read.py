"""NBD read speed: drtool's NBD server against nbdkit and qemu-nbd on one image.

    .venv/bin/python bench/nbd_read.py [--size 2G] [--runs 5] [--fio-seconds 5] [--workers 4,0]

Creates a random image (warm in the page cache), serves it three ways on Unix
sockets, and alternates `nbdcopy URI null:` through each (medians of --runs):

  drtool     drtool.nbd.NbdServer in this process with a plain FileExport,
             once per --workers value (0: the reader executes requests itself)
  nbdkit     `nbdkit -r file`
  qemu-nbd   `qemu-nbd -r -e 4` (4 clients, so nbdcopy may open its 4 connections)

then `fio --ioengine=nbd` random 4 KiB reads at iodepth 32 (one connection),
drtool against nbdkit, medians of max(1, runs // 2).  Besides wall-clock
rates it reports the CPU time each server spent per GiB or per I/O, which
stays meaningful when other work shares the machine.

Other benchmarks reuse `serve_export` (any NbdExport factory behind the same
server) and `compare`, to put drtool's real export before the same clients.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_size, random_image, row, scratch_dir, warm  # noqa: E402
from drtool.nbd import FileExport, NbdExport, NbdServer  # noqa: E402
from drtool.nbd.server import DEFAULT_WORKERS  # noqa: E402

#: image path -> the export to serve (a FileExport, or drtool's engine export)
ExportFactory = Callable[[str], NbdExport]

EXPORT_NAME = "bench"
_GIB = 1 << 30
_served = itertools.count()


@dataclass
class Endpoint:
    """A running server: where clients connect, and the CPU time it has used so far."""

    uri: str
    cpu_seconds: Callable[[], float]


Subject = Callable[[], AbstractContextManager[Endpoint]]


def file_export(image: str) -> NbdExport:
    return FileExport(image, EXPORT_NAME, "bench image", read_only=True)


@contextmanager
def serve_export(factory: ExportFactory, image: str,
                 workers: int = DEFAULT_WORKERS) -> Iterator[Endpoint]:
    """Serve ``factory(image)`` with drtool's NbdServer in this process.

    Its CPU time is this process's: the benchmark's own thread only waits
    for the client meanwhile.
    """
    export = factory(image)
    socket_path = f"{image}.drtool-{next(_served)}.sock"
    server = NbdServer(lambda: {export.name: export}, unix_path=socket_path, workers=workers)
    server.start()
    try:
        yield Endpoint(f"nbd+unix:///{export.name}?socket={socket_path}", time.process_time)
    finally:
        server.stop()
        close = getattr(export, "close", None)
        if close is not None:
            close()


@contextmanager
def _peer_server(command: list[str], socket_path: str, uri: str,
                 timeout: float = 30.0) -> Iterator[Endpoint]:
    """Run a peer server in the foreground until its socket exists; its output goes to a log."""
    if os.path.exists(socket_path):  # left by the previous run of the same peer
        os.unlink(socket_path)
    log_path = f"{socket_path}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as log:
                    raise RuntimeError(f"{command[0]} did not start: {log.read()}")
            time.sleep(0.02)
        yield Endpoint(uri, lambda: _process_cpu_seconds(process.pid))
    finally:
        process.terminate()
        process.wait()


def _process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def nbdkit_file(image: str) -> AbstractContextManager[Endpoint]:
    socket_path = f"{image}.nbdkit.sock"
    return _peer_server(["nbdkit", "-f", "-r", "-U", socket_path, "file", image], socket_path,
                        f"nbd+unix:///?socket={socket_path}")


def qemu_nbd(image: str) -> AbstractContextManager[Endpoint]:
    socket_path = f"{image}.qemu.sock"
    return _peer_server(["qemu-nbd", "-r", "-f", "raw", "-e", "4", "-t", "-x", EXPORT_NAME,
                         "-k", socket_path, image], socket_path,
                        f"nbd+unix:///{EXPORT_NAME}?socket={socket_path}")


def nbdcopy_run(endpoint: Endpoint) -> tuple[float, float]:
    """Copy the whole export to null: with nbdcopy; (seconds, server CPU seconds)."""
    cpu = endpoint.cpu_seconds()
    started = time.perf_counter()
    subprocess.run(["nbdcopy", endpoint.uri, "null:"], check=True)
    return time.perf_counter() - started, endpoint.cpu_seconds() - cpu


def fio_run(endpoint: Endpoint, size: int, seconds: float) -> tuple[float, float]:
    """fio's nbd engine, random 4 KiB reads, 32 in flight: (IOPS, server CPU seconds per I/O)."""
    cpu = endpoint.cpu_seconds()
    result = subprocess.run(
        ["fio", "--name=randread", "--ioengine=nbd", f"--uri={endpoint.uri}", "--rw=randread",
         "--bs=4k", "--iodepth=32", f"--size={size}", "--time_based", f"--runtime={seconds}",
         "--output-format=json"],
        check=True, capture_output=True, text=True)
    used = endpoint.cpu_seconds() - cpu
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    report = json.loads(result.stdout[result.stdout.index("{"):])
    read = report["jobs"][0]["read"]
    return read["iops"], used / max(1, read["total_ios"])


def _alternate(subjects: dict[str, Subject], runs: int,
               measure: Callable[[Endpoint], tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Start every subject, measure each in turn ``runs`` times; medians of both numbers."""
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in subjects}
    with ExitStack() as stack:
        endpoints = {label: stack.enter_context(subject()) for label, subject in subjects.items()}
        for _ in range(runs):
            for label, endpoint in endpoints.items():
                samples[label].append(measure(endpoint))
    return {label: (median([a for a, _ in values]), median([b for _, b in values]))
            for label, values in samples.items()}


def compare(image: str, size: int, runs: int, fio_seconds: float,
            drtool: dict[str, Subject]) -> dict:
    """nbdcopy and fio through the ``drtool`` subjects, nbdkit and qemu-nbd."""
    peers: dict[str, Subject] = {"nbdkit": lambda: nbdkit_file(image),
                                 "qemu-nbd": lambda: qemu_nbd(image)}
    copies = _alternate({**drtool, **peers}, runs, nbdcopy_run)
    fio = _alternate({**drtool, "nbdkit": peers["nbdkit"]}, max(1, runs // 2),
                     lambda endpoint: fio_run(endpoint, size, fio_seconds))
    result: dict = {"bytes": size, "runs": runs, "servers": {}}
    for label, (seconds, cpu) in copies.items():
        entry = {"nbdcopy_gbps": size / seconds / 1e9, "nbdcopy_cpu_s_per_gib": cpu / (size / _GIB)}
        if label in fio:
            iops, cpu_per_io = fio[label]
            entry.update(fio_iops=iops, fio_cpu_us_per_io=cpu_per_io * 1e6)
        result["servers"][label] = entry
    nbdkit, qemu = result["servers"]["nbdkit"], result["servers"]["qemu-nbd"]
    for label in drtool:
        entry = result["servers"][label]
        entry["nbdcopy_vs_nbdkit"] = entry["nbdcopy_gbps"] / nbdkit["nbdcopy_gbps"]
        entry["nbdcopy_vs_qemu_nbd"] = entry["nbdcopy_gbps"] / qemu["nbdcopy_gbps"]
        entry["fio_vs_nbdkit"] = entry["fio_iops"] / nbdkit["fio_iops"]
    return result


def print_rows(result: dict) -> None:
    print(f"nbdcopy: {result['bytes'] >> 20} MiB, median of {result['runs']}; "
          "fio: randread 4k iodepth 32")
    print(row("server", "nbdcopy GB/s", "vs nbdkit", "vs qemu-nbd", "CPU s/GiB",
              "fio kIOPS", "vs nbdkit", "CPU µs/IO"))
    print(row(*["---"] * 8))
    for label, entry in result["servers"].items():
        print(row(label, f"{entry['nbdcopy_gbps']:.2f}",
                  f"{entry['nbdcopy_vs_nbdkit']:.2f}" if "nbdcopy_vs_nbdkit" in entry else "",
                  f"{entry['nbdcopy_vs_qemu_nbd']:.2f}" if "nbdcopy_vs_qemu_nbd" in entry else "",
                  f"{entry['nbdcopy_cpu_s_per_gib']:.2f}",
                  f"{entry['fio_iops'] / 1000:.1f}" if "fio_iops" in entry else "",
                  f"{entry['fio_vs_nbdkit']:.2f}" if "fio_vs_nbdkit" in entry else "",
                  f"{entry['fio_cpu_us_per_io']:.1f}" if "fio_cpu_us_per_io" in entry else ""))


def main(argv: list[str] | None = None, export_factory: ExportFactory = file_export) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument("--workers", default=f"{DEFAULT_WORKERS},0",
                        help="comma-separated worker counts to compare (default %(default)s)")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("nbdcopy", "nbdkit", "qemu-nbd", "fio") if shutil.which(tool) is None]
    if missing:
        parser.error(f"missing tools: {', '.join(missing)}")
    size = parse_size(args.size)
    work = scratch_dir("nbd-read-")
    try:
        image = os.path.join(work, "random.img")
        random_image(image, size)
        warm(image)
        drtool: dict[str, Subject] = {
            f"drtool workers={workers}": lambda workers=workers: serve_export(export_factory, image, workers)
            for workers in (int(text) for text in args.workers.split(","))}
        started = time.monotonic()
        result = compare(image, size, args.runs, args.fio_seconds, drtool)
        result["seconds"] = time.monotonic() - started
        print_rows(result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
