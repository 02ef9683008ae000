"""drtool scrub throughput against b3sum on the same file (warm page cache).

    .venv/bin/python bench/scrub.py [--size 2G] [--runs 5]

One round runs, on one random image: `drtool scrub --json` in a fresh process, the same
command answered by a running `drtool agent` (the usual set-up on a primary: a long-lived
process; the client only asks), and `b3sum` (default threads); the fresh and the agent scrub
swap places every other round, b3sum runs between them.  Rates: the scrub's own `seconds`
and b3sum's wall clock; medians of --runs rounds and their ratio, and the same ratio
within each round.  CPU seconds per GiB (utime + stime; for the agent row, the agent's
process): less sensitive to a busy machine than the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import DRTOOL, median, parse_size, random_image, row, scratch_dir, warm  # noqa: E402
from bench.nbd_read import _process_cpu_seconds  # noqa: E402

_GIB = 1 << 30


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scrub_run(env: dict, agent_pid: int | None = None) -> tuple[float, float]:
    """(seconds the scrub took by its own report, CPU seconds of the process that scrubbed)."""
    children = _children_cpu()
    agent = _process_cpu_seconds(agent_pid) if agent_pid else 0.0
    out = subprocess.run([*DRTOOL, "scrub", "bench", "--json"], env=env, check=True, capture_output=True).stdout
    report = json.loads(out)
    assert report["bad_count"] == 0, report
    if agent_pid:
        return report["seconds"], _process_cpu_seconds(agent_pid) - agent
    return report["seconds"], _children_cpu() - children


def b3sum_run(image: str) -> tuple[float, float]:
    children = _children_cpu()
    started = time.perf_counter()
    subprocess.run(["b3sum", image], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _children_cpu() - children


@contextmanager
def running_agent(env: dict, work: str) -> Iterator[int]:
    """A `drtool agent` serving the volume (so `drtool scrub` asks it): its pid."""
    agent = subprocess.Popen([*DRTOOL, "agent", "bench", "--listen", "none", "--nbd-socket",
                              os.path.join(work, "nbd.sock")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if "serving" not in agent.stdout.readline():
            raise SystemExit("drtool agent did not start")
        yield agent.pid
    finally:
        agent.terminate()
        agent.wait(timeout=60)


def measure(env: dict, image: str, work: str, runs: int) -> dict:
    """``runs`` rounds of: fresh process, b3sum, through the agent (reversed every other round).
    A fresh process scrubs only while no agent holds the volume (else the CLI asks the agent),
    so the agent is started for its turn and stopped after it."""
    size = os.path.getsize(image)
    samples: dict[str, list[tuple[float, float]]] = {"fresh process": [], "through the agent": [], "b3sum": []}
    loads = [os.getloadavg()[0]]
    for round_no in range(runs):
        order = ["fresh process", "b3sum", "through the agent"]
        if round_no % 2:
            order.reverse()
        for label in order:
            if label == "b3sum":
                samples[label].append(b3sum_run(image))
            elif label == "fresh process":
                samples[label].append(scrub_run(env))
            else:
                with running_agent(env, work) as pid:
                    samples[label].append(scrub_run(env, pid))
    loads.append(os.getloadavg()[0])
    result: dict = {"bytes": size, "runs": runs, "load_average": loads}
    peer = samples["b3sum"]
    for label, values in samples.items():
        entry = {"gbps": size / median([s for s, _ in values]) / 1e9,
                 "cpu_s_per_gib": median([c for _, c in values]) / (size / _GIB),
                 "samples": values}
        if label != "b3sum":
            entry["ratio"] = entry["gbps"] / (size / median([s for s, _ in peer]) / 1e9)
            rounds = [b / a for (a, _), (b, _) in zip(values, peer)]
            entry["ratio_rounds"] = [min(rounds), max(rounds)]
        result[label] = entry
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = scratch_dir("scrub-")
    try:
        image = os.path.join(work, "random.img")
        random_image(image, size)
        env = {**os.environ, "DRTOOL_STATE_ROOT": os.path.join(work, "state")}
        subprocess.run([*DRTOOL, "init", "bench", "--device", image, "--json"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        warm(image)
        result = measure(env, image, work, args.runs)
        print(f"scrub {size >> 20} MiB, warm page cache, medians of {args.runs} rounds; load average "
              f"" + " / ".join(f"{x:.1f}" for x in result["load_average"]) + " (start / end)")
        print(row("scrub", "GB/s", "b3sum GB/s", "ratio (rounds)", "CPU s/GiB", "b3sum CPU s/GiB"))
        print(row(*["---"] * 6))
        peer = result["b3sum"]
        for label in ("fresh process", "through the agent"):
            entry = result[label]
            print(row(f"scrub ({label})", f"{entry['gbps']:.2f}", f"{peer['gbps']:.2f}",
                      f"{entry['ratio']:.2f} ({entry['ratio_rounds'][0]:.2f}-{entry['ratio_rounds'][1]:.2f})",
                      f"{entry['cpu_s_per_gib']:.3f}", f"{peer['cpu_s_per_gib']:.3f}"))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=2)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
