"""The read agent against nbdkit and qemu-nbd, healthy and degraded, and the recovery numbers.

    .venv/bin/python bench/agent.py [--size 2G] [--runs 5] [--fio-seconds 5] [--skip-sparse]

1. healthy: `drtool agent` (a real subprocess, verifying every region it reads) vs
   `nbdkit file` and `qemu-nbd` on the same warm 2 GiB image: nbdcopy to null: (medians of
   --runs, alternated) and fio randread 4k iodepth 32, after one 4 KiB read in every region
   (the agent remembers block digests then, and keeps them in its maps: the steady state of a
   long-running agent); then fio randread 4k iodepth 1 (p50 and p99 completion latency)
   against nbdkit;
2. degraded: 10 % of the regions corrupted and the volume recovered before every run, so each
   full nbdcopy fetches them from a local `drtool serve` (verified, with copy-on-read and
   readahead as shipped); vs nbdkit on the healthy image; and the bytes fetched from the
   replica over the bytes of the bad regions;
3. time to recover: from `recover` (through the running agent's control socket) to the first
   verified read of a bad region, for a 1 GiB and a 16 GiB sparse volume.

A/B against an older commit (only the healthy rows, 64K regions):

    .venv/bin/python bench/agent.py --rev c7c8018 [--new HEAD] --size 2G --runs 5 --fio-seconds 5

``--rev REV``'s drtool (``git archive`` into the scratch directory) and the new one (``--new
REV``, archived the same way; default: this checkout) each register the same warm image in
their own state root with their own ``drtool init`` and serve it with their own ``drtool
agent`` (same venv interpreter and packages, PYTHONPATH pointing at the tree, started outside
the checkout so ``-m drtool`` cannot import it from the working directory), next to ``nbdkit
file``.  All three run for the whole bench and are measured in rounds (old, new, nbdkit; the
two agents swap places every other round): ``--runs`` rounds of nbdcopy to null: and then
``--runs`` rounds of fio randread 4k iodepth 32, then ``--runs`` rounds of fio randread 4k
iodepth 1 (completion latency p50 and p99, issue 12's latency row), after one 4 KiB read in
every region per server (qemu-io; reported as "fill": a new agent remembers block digests
then).  Every figure is a median with its min-max; the CPU is the agent process's own (utime
+ stime of all its threads), per GiB and per I/O.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, parse_size, random_image, row, scratch_dir, warm  # noqa: E402
from bench.nbd_read import (  # noqa: E402
    Endpoint, Subject, _alternate, _process_cpu_seconds, compare, fio_run, nbdcopy_run, nbdkit_file, print_rows,
)
from bench.remote_fetch import _start_server  # noqa: E402
from drtool import api  # noqa: E402

RS = 64 * 1024
DRTOOL = [sys.executable, "-m", "drtool"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIB = 1 << 30


def _env(root: str, source: str) -> dict[str, str]:
    """The environment of a drtool process run from the tree ``source`` (holding ``drtool/``)."""
    return {**os.environ, "DRTOOL_STATE_ROOT": root,
            "PYTHONPATH": source + os.pathsep + os.environ.get("PYTHONPATH", "")}


@contextmanager
def agent(root: str, name: str, work: str, source: str = REPO) -> Iterator[Endpoint]:
    """``drtool agent`` from ``source`` serving ``name`` on a Unix socket only (both the old
    agent, whose default is also TCP 127.0.0.1:10809, and the new one take ``--listen none``).
    It runs in ``work``, not the checkout: ``-m drtool`` imports from the working directory
    before PYTHONPATH."""
    sock = os.path.join(work, f"{os.path.basename(root)}.{name}.agent.sock")
    log = os.path.join(work, f"{os.path.basename(root)}.{name}.agent.log")
    proc = subprocess.Popen([*DRTOOL, "agent", name, "--nbd-socket", sock, "--listen", "none"],
                            stdout=subprocess.PIPE, stderr=open(log, "ab"),
                            text=True, env=_env(root, source), cwd=work)
    try:
        announce = proc.stdout.readline() + proc.stdout.readline()
        if "nbd+unix" not in announce:
            with open(log, errors="replace") as handle:
                raise SystemExit(f"drtool agent did not start: {announce!r}\n{handle.read()[-4000:]}")
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
    with agent(root, "healthy", work) as endpoint:  # the steady state: block digests remembered
        seconds, cpu_per_read = fill_run(endpoint, size)  # (kept in the maps when the agent stops)
    print(row("fill: one 4 KiB read in every region", f"{seconds:.1f} s", f"agent CPU {cpu_per_read:.1f} µs/read"))
    result = compare(image, size, runs, fio_seconds, {"drtool agent": lambda: agent(root, "healthy", work)})
    print_rows(result)
    result["fill"] = {"seconds": seconds, "cpu_us_per_read": cpu_per_read}
    result["qd1"] = latency(root, work, image, size, runs, fio_seconds)
    return result


def latency(root: str, work: str, image: str, size: int, runs: int, fio_seconds: float) -> dict:
    """fio randread 4k iodepth 1 through the agent and nbdkit, alternated (after one 4 KiB read
    in every region each: the agent's block digests remembered, as in a long-running agent)."""
    samples: dict[str, list[tuple[float, float, float]]] = {"drtool agent": [], "nbdkit": []}
    with agent(root, "healthy", work) as drtool, nbdkit_file(image) as peer:
        endpoints = {"drtool agent": drtool, "nbdkit": peer}
        for endpoint in endpoints.values():
            fill_run(endpoint, size)
        for _ in range(runs):
            for label, endpoint in endpoints.items():
                samples[label].append(fio_latency_run(endpoint, size, fio_seconds))
    result = {label: {"p50_us": median([s[0] for s in values]), "p99_us": median([s[1] for s in values]),
                      "cpu_us_per_io": median([s[2] for s in values])} for label, values in samples.items()}
    mine, theirs = result["drtool agent"], result["nbdkit"]
    result["p50_over_nbdkit"] = mine["p50_us"] / theirs["p50_us"]
    result["p99_over_nbdkit"] = mine["p99_us"] / theirs["p99_us"]
    print(row("fio randread 4k iodepth 1", f"drtool p50/p99 {mine['p50_us']:.0f}/{mine['p99_us']:.0f} µs",
              f"nbdkit {theirs['p50_us']:.0f}/{theirs['p99_us']:.0f} µs",
              f"x nbdkit {result['p50_over_nbdkit']:.2f}/{result['p99_over_nbdkit']:.2f}",
              f"CPU {mine['cpu_us_per_io']:.1f} µs/IO"))
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


def degraded(work: str, image: str, size: int, runs: int, url: str, token: str, server_pid: int | None = None) -> dict:
    """Each run: 10 % of the regions corrupted, scrubbed, recovered; one full nbdcopy (timed: the
    first read fetches every bad region from the replica, verified, copy-on-read on); failback.
    CPU: the agent's per GiB read, and the replica server's (``server_pid``) per GiB fetched."""
    root = os.path.join(work, "state-degraded")
    damaged = os.path.join(work, "damaged.img")
    shutil.copyfile(image, damaged)
    api.init_volume("degraded", damaged, "64K", root=root)
    api.protect("degraded", url, token, root=root)
    regions = size // RS
    bad = random.Random(10).sample(range(regions), regions // 10)
    drtool_s, nbdkit_s, ratios, agent_cpu, server_cpu, nbdkit_cpu = [], [], [], [], [], []
    with agent(root, "degraded", work) as endpoint, nbdkit_file(image) as peer:
        for _ in range(runs):
            with open(damaged, "r+b") as handle:
                for region in bad:
                    handle.seek(region * RS + 100)
                    handle.write(os.urandom(64))
            assert len(api.scrub_volume("degraded", root=root)["bad_regions"]) > 0
            api.recover("degraded", root=root)
            warm(damaged)
            served = _process_cpu_seconds(server_pid) if server_pid else 0.0
            seconds, cpu = nbdcopy_run(endpoint)
            drtool_s.append(seconds)
            fetched = api.status("degraded", root=root, probe_peer=False)[0]["recovery"]["fetched_bytes"]
            agent_cpu.append(cpu / (size / _GIB))
            if server_pid:
                server_cpu.append((_process_cpu_seconds(server_pid) - served) / (fetched / _GIB))
            ratios.append(fetched / (len(bad) * RS))
            api.failback("degraded", root=root)
            warm(image)
            seconds, cpu = nbdcopy_run(peer)
            nbdkit_s.append(seconds)
            nbdkit_cpu.append(cpu / (size / _GIB))
    result = {
        "drtool_gbps": size / median(drtool_s) / 1e9,
        "nbdkit_gbps": size / median(nbdkit_s) / 1e9,
        "fetched_over_bad": max(ratios),
        "bad_regions": len(bad),
        "agent_cpu_s_per_gib": median(agent_cpu),
        "nbdkit_cpu_s_per_gib": median(nbdkit_cpu),
        "server_cpu_s_per_gib_fetched": median(server_cpu) if server_cpu else None,
        "drtool_seconds": drtool_s, "nbdkit_seconds": nbdkit_s,
    }
    result["ratio"] = result["drtool_gbps"] / result["nbdkit_gbps"]
    server = result["server_cpu_s_per_gib_fetched"]
    print(row("degraded 10%", f"{size >> 20} MiB", f"drtool {result['drtool_gbps']:.2f} GB/s",
              f"nbdkit (healthy image) {result['nbdkit_gbps']:.2f} GB/s", f"ratio {result['ratio']:.2f}",
              f"fetched/bad bytes (worst run) {result['fetched_over_bad']:.3f}",
              f"CPU s/GiB: agent {result['agent_cpu_s_per_gib']:.2f}, nbdkit {result['nbdkit_cpu_s_per_gib']:.2f}, "
              f"replica server {'-' if server is None else f'{server:.2f}'} per GiB fetched"))
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


def source_tree(rev: str) -> tuple[str, str]:
    """``git archive`` of REV's drtool package into a scratch directory: (directory, short sha)."""
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", f"{rev}^{{commit}}"], check=True,
                         capture_output=True, text=True).stdout.strip()
    target = scratch_dir(f"agent-src-{sha}-")
    archive = subprocess.run(["git", "-C", REPO, "archive", sha, "drtool"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target, sha


def _checkout_label() -> str:
    described = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                               text=True).stdout.strip()
    return f"{described} (checkout)"


def _spread(values: list[float], scale: float = 1.0) -> dict:
    return {"median": median(values) * scale, "min": min(values) * scale, "max": max(values) * scale,
            "samples": [v * scale for v in values]}


def _rounds(endpoints: dict[str, Endpoint], swap: tuple[str, str], runs: int,
            measure: Callable[[Endpoint], tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    """``runs`` rounds over every endpoint in order; the two ``swap`` labels trade places every
    other round, so neither agent always runs first (right after the peer)."""
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in endpoints}
    for round_no in range(runs):
        order = list(endpoints)
        if round_no % 2:
            a, b = order.index(swap[0]), order.index(swap[1])
            order[a], order[b] = order[b], order[a]
        for label in order:
            samples[label].append(measure(endpoints[label]))
    return samples


def fio_latency_run(endpoint: Endpoint, size: int, seconds: float) -> tuple[float, float, float]:
    """fio's nbd engine, random 4 KiB reads one at a time (iodepth 1): (p50 µs, p99 µs of the
    completion latency, server CPU µs per I/O)."""
    cpu = endpoint.cpu_seconds()
    result = subprocess.run(
        ["fio", "--name=randread-qd1", "--ioengine=nbd", f"--uri={endpoint.uri}", "--rw=randread",
         "--bs=4k", "--iodepth=1", f"--size={size}", "--time_based", f"--runtime={seconds}",
         "--percentile_list=50:99", "--output-format=json"],
        check=True, capture_output=True, text=True)
    used = endpoint.cpu_seconds() - cpu
    report = json.loads(result.stdout[result.stdout.index("{"):])
    read = report["jobs"][0]["read"]
    percentiles = read["clat_ns"]["percentile"]
    p50 = next(v for k, v in percentiles.items() if float(k) == 50.0) / 1000
    p99 = next(v for k, v in percentiles.items() if float(k) == 99.0) / 1000
    return p50, p99, used / max(1, read["total_ios"]) * 1e6


def fill_run(endpoint: Endpoint, size: int) -> tuple[float, float]:
    """One 4 KiB read at the start of every 64 KiB region, one at a time (qemu-io, commands on
    stdin): (seconds, server CPU µs per read)."""
    cpu = endpoint.cpu_seconds()
    commands = "".join(f"read {offset} 4096\n" for offset in range(0, size, RS))
    started = time.perf_counter()
    done = subprocess.run(["qemu-io", "-r", "-f", "raw", endpoint.uri], input=commands, check=True,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.stdout.count("read 4096/4096 bytes") != size // RS:
        raise SystemExit(f"fill pass: not every read succeeded: {done.stdout[-2000:]}")
    return seconds, (endpoint.cpu_seconds() - cpu) / (size // RS) * 1e6


def ab_healthy(work: str, image: str, size: int, runs: int, fio_seconds: float,
               versions: dict[str, str]) -> dict:
    """The healthy rows, old agent / new agent / nbdkit alternated in one run.

    ``versions``: label -> source tree (old first).  Returns every sample and its medians."""
    labels = list(versions)
    roots = {label: os.path.join(work, f"state-{side}") for label, side in zip(labels, ("old", "new"))}
    for label, source in versions.items():  # each version registers the image with its own init
        subprocess.run([*DRTOOL, "init", "healthy", "--device", image, "--region-size", "64K"],
                       env=_env(roots[label], source), cwd=work, check=True, stdout=subprocess.DEVNULL)
    warm(image)
    subjects: dict[str, Subject] = {
        label: (lambda label=label, source=source: agent(roots[label], "healthy", work, source))
        for label, source in versions.items()}
    subjects["nbdkit"] = lambda: nbdkit_file(image)
    with ExitStack() as stack:
        endpoints = {label: stack.enter_context(subject()) for label, subject in subjects.items()}
        # One 4 KiB read in every region first, each server: the steady state of a long-running
        # agent (the new one remembers a region's block digests at its first small read, once;
        # that pass is reported apart, "fill").
        fill = {label: fill_run(endpoint, size) for label, endpoint in endpoints.items()}
        load = [os.getloadavg()[0]]
        copies = _rounds(endpoints, (labels[0], labels[1]), runs, nbdcopy_run)
        load.append(os.getloadavg()[0])
        fio = _rounds(endpoints, (labels[0], labels[1]), runs, lambda endpoint: fio_run(endpoint, size, fio_seconds))
        load.append(os.getloadavg()[0])
        qd1 = _rounds(endpoints, (labels[0], labels[1]), runs,
                      lambda endpoint: fio_latency_run(endpoint, size, fio_seconds))
        load.append(os.getloadavg()[0])
    result: dict = {"bytes": size, "runs": runs, "fio_seconds": fio_seconds, "load_average": load, "servers": {}}
    for label in endpoints:
        result["servers"][label] = {
            "nbdcopy_gbps": _spread([size / seconds / 1e9 for seconds, _ in copies[label]]),
            "nbdcopy_cpu_s_per_gib": _spread([cpu / (size / _GIB) for _, cpu in copies[label]]),
            "fio_kiops": _spread([iops / 1000 for iops, _ in fio[label]]),
            "fio_cpu_us_per_io": _spread([cpu for _, cpu in fio[label]], 1e6),
            "fill_seconds": fill[label][0], "fill_cpu_us_per_io": fill[label][1],
            "qd1_p50_us": _spread([p50 for p50, _, _ in qd1[label]]),
            "qd1_p99_us": _spread([p99 for _, p99, _ in qd1[label]]),
            "qd1_cpu_us_per_io": _spread([cpu for _, _, cpu in qd1[label]]),
        }
    peer = result["servers"]["nbdkit"]
    for label in labels:
        entry = result["servers"][label]
        entry["nbdcopy_vs_nbdkit"] = entry["nbdcopy_gbps"]["median"] / peer["nbdcopy_gbps"]["median"]
        entry["fio_vs_nbdkit"] = entry["fio_kiops"]["median"] / peer["fio_kiops"]["median"]
        # the same ratio within each round (the agent against nbdkit measured seconds apart)
        entry["nbdcopy_vs_nbdkit_rounds"] = _spread([a / b for a, b in zip(entry["nbdcopy_gbps"]["samples"],
                                                                         peer["nbdcopy_gbps"]["samples"])])
        entry["fio_vs_nbdkit_rounds"] = _spread([a / b for a, b in zip(entry["fio_kiops"]["samples"],
                                                                     peer["fio_kiops"]["samples"])])
        for key in ("qd1_p50_us", "qd1_p99_us"):  # latency: how many times nbdkit's (lower is better)
            entry[f"{key}_over_nbdkit"] = entry[key]["median"] / peer[key]["median"]
            entry[f"{key}_over_nbdkit_rounds"] = _spread([a / b for a, b in zip(entry[key]["samples"],
                                                                               peer[key]["samples"])])
    old, new = (result["servers"][label] for label in labels)
    keys = ("nbdcopy_gbps", "nbdcopy_cpu_s_per_gib", "fio_kiops", "fio_cpu_us_per_io", "qd1_p50_us", "qd1_p99_us",
            "qd1_cpu_us_per_io")
    result["new_over_old"] = {key: new[key]["median"] / old[key]["median"] for key in keys}
    # paired: new over old within each round (measured seconds apart), and in how many rounds new > old
    result["new_over_old_rounds"] = {
        key: {**_spread([b / a for a, b in zip(old[key]["samples"], new[key]["samples"])]),
              "new_higher": sum(b > a for a, b in zip(old[key]["samples"], new[key]["samples"]))}
        for key in keys}
    print_ab(result)
    return result


def _cell(entry: dict, fmt: str) -> str:
    return f"{entry['median']:{fmt}} ({entry['min']:{fmt}}-{entry['max']:{fmt}})"


def _ratio(of_medians: float, rounds: dict) -> str:
    """The ratio of the medians, and the min-max of the same ratio taken within each round."""
    return f"{of_medians:.2f} ({rounds['min']:.2f}-{rounds['max']:.2f})"


def print_ab(result: dict) -> None:
    print(f"nbdcopy {result['bytes'] >> 20} MiB to null:, fio randread 4k iodepth 32 {result['fio_seconds']:g} s; "
          f"medians of {result['runs']} rounds (min-max); load average "
          + " / ".join(f"{x:.1f}" for x in result["load_average"]) + " (start / after nbdcopy / after fio)")
    print(row("server", "nbdcopy GB/s", "vs nbdkit (rounds)", "CPU s/GiB", "fio kIOPS", "vs nbdkit (rounds)",
              "CPU µs/IO"))
    print(row(*["---"] * 7))
    for label, entry in result["servers"].items():
        paired = "nbdcopy_vs_nbdkit" in entry
        print(row(label, _cell(entry["nbdcopy_gbps"], ".2f"),
                  _ratio(entry["nbdcopy_vs_nbdkit"], entry["nbdcopy_vs_nbdkit_rounds"]) if paired else "",
                  _cell(entry["nbdcopy_cpu_s_per_gib"], ".2f"), _cell(entry["fio_kiops"], ".1f"),
                  _ratio(entry["fio_vs_nbdkit"], entry["fio_vs_nbdkit_rounds"]) if paired else "",
                  _cell(entry["fio_cpu_us_per_io"], ".1f")))
    ratios = result["new_over_old"]
    print(row("new / old, medians", f"{ratios['nbdcopy_gbps']:.2f}", "", f"{ratios['nbdcopy_cpu_s_per_gib']:.2f}",
              f"{ratios['fio_kiops']:.2f}", "", f"{ratios['fio_cpu_us_per_io']:.2f}"))
    rounds = result["new_over_old_rounds"]

    def paired(key: str) -> str:
        entry = rounds[key]
        return f"{_cell(entry, '.2f')}, higher in {entry['new_higher']} of {len(entry['samples'])}"
    print(row("new / old within each round", paired("nbdcopy_gbps"), "", paired("nbdcopy_cpu_s_per_gib"),
              paired("fio_kiops"), "", paired("fio_cpu_us_per_io")))
    print()
    print(f"fio randread 4k iodepth 1, {result['fio_seconds']:g} s: completion latency, medians of "
          f"{result['runs']} rounds (min-max); x nbdkit: lower is better; fill: one 4 KiB read in every "
          "region before the rounds (qemu-io, one at a time): seconds, CPU µs per read")
    print(row("server", "p50 µs", "x nbdkit (rounds)", "p99 µs", "x nbdkit (rounds)", "CPU µs/IO", "fill s",
              "fill CPU µs/read"))
    print(row(*["---"] * 8))
    for label, entry in result["servers"].items():
        paired_rows = "qd1_p50_us_over_nbdkit" in entry
        print(row(label, _cell(entry["qd1_p50_us"], ".0f"),
                  _ratio(entry["qd1_p50_us_over_nbdkit"], entry["qd1_p50_us_over_nbdkit_rounds"]) if paired_rows else "",
                  _cell(entry["qd1_p99_us"], ".0f"),
                  _ratio(entry["qd1_p99_us_over_nbdkit"], entry["qd1_p99_us_over_nbdkit_rounds"]) if paired_rows else "",
                  _cell(entry["qd1_cpu_us_per_io"], ".1f"), f"{entry['fill_seconds']:.1f}",
                  f"{entry['fill_cpu_us_per_io']:.1f}"))


def main_ab(args: argparse.Namespace, size: int) -> dict:
    work = scratch_dir("agent-ab-")
    trees: list[str] = []
    try:
        old_source, old_sha = source_tree(args.rev)
        trees.append(old_source)
        if args.new:
            new_source, new_sha = source_tree(args.new)
            trees.append(new_source)
            new_label = new_sha
        else:
            new_source, new_label = REPO, _checkout_label()
        versions = {f"drtool agent {old_sha} (old)": old_source, f"drtool agent {new_label} (new)": new_source}
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"A/B {started}: old {old_sha}, new {new_label}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        image = os.path.join(work, "random.img")
        random_image(image, size)
        result = ab_healthy(work, image, size, args.runs, args.fio_seconds, versions)
        result.update(date=started, old=old_sha, new=new_label)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tree in trees:
            shutil.rmtree(tree, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--fio-seconds", type=float, default=5.0)
    parser.add_argument("--skip-sparse", action="store_true", help="skip the 16 GiB time-to-recover run")
    parser.add_argument("--rev", help="A/B: this commit's agent against the new one and nbdkit, healthy rows only")
    parser.add_argument("--new", help="with --rev: the new side is this commit (default: the checkout)")
    parser.add_argument("--json", help="with --rev: also write every sample to this file")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.new and not args.rev:
        parser.error("--new needs --rev")
    if args.rev:
        return main_ab(args, size)
    work = scratch_dir("agent-")
    server, url, token = _server(work)
    try:
        image = os.path.join(work, "random.img")
        random_image(image, size)
        out = {"healthy": healthy(work, image, size, args.runs, args.fio_seconds),
               "small_regions": small_regions(work, image, size, max(1, args.runs // 2), args.fio_seconds),
               "degraded": degraded(work, image, size, args.runs, url, token, server.pid),
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
