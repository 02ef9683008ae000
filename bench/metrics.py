"""What the Prometheus metrics cost (drtool/metrics.py, docs/metrics.md).

    .venv/bin/python bench/metrics.py [--rounds 5] [--calls 2000000] [--scrapes 200]

1. per NBD request: an export method with ``@metrics.counted`` against the same method without
   it, called in one thread, alternated in rounds: the CPU the count adds to every request
   (compare with the agent's CPU µs/IO in docs/benchmarks.md, "The read agent");
2. per scrape: a real ``drtool agent --metrics-listen`` (one protected 1 GiB volume, 64 MiB of
   it written) and a real ``drtool serve --metrics-listen``; the agent's CPU for one scrape
   (curl) against its CPU for one ``drtool status --json`` through the control socket, which is
   what an operator's script would run instead, and the server's CPU for one scrape against one
   ``GET /v1/volumes/NAME`` (curl), which describes a replica the same way.  Alternated in rounds.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, row, scratch_dir  # noqa: E402
from bench.nbd_read import _process_cpu_seconds  # noqa: E402
from drtool import metrics  # noqa: E402

DRTOOL = [sys.executable, "-m", "drtool"]


class Plain:
    def read(self, offset: int, length: int) -> None:
        return None


class Counted:
    def __init__(self) -> None:
        self.nbd_counts = metrics.NbdCounts()

    @metrics.counted("read")
    def read(self, offset: int, length: int) -> None:
        return None


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_call(rounds: int, calls: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"plain": [], "counted": []}
    for index in range(rounds):
        order = [("plain", Plain()), ("counted", Counted())]
        for name, subject in order if index % 2 == 0 else reversed(order):
            call = subject.read
            started = _cpu()
            for _ in range(calls):
                call(0, 4096)
            found[name].append((_cpu() - started) / calls * 1e6)
    return found


def _start(argv: list[str], env: dict[str, str], lines: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    text = "".join(proc.stdout.readline() for _ in range(lines))
    return proc, text


def per_scrape(rounds: int, scrapes: int) -> dict[str, list[float]]:
    work = scratch_dir("metrics")
    env = {**os.environ, "DRTOOL_STATE_ROOT": os.path.join(work, "state")}
    token = os.path.join(work, "token")
    with open(token, "w") as handle:
        handle.write("t0ken-" + "x" * 26)
    os.chmod(token, 0o600)
    image = os.path.join(work, "dev.img")
    with open(image, "wb") as handle:
        handle.truncate(1 << 30)
        handle.write(os.urandom(64 << 20))
    server, text = _start([*DRTOOL, "serve", "--root", os.path.join(work, "rr"), "--listen", "127.0.0.1:0",
                           "--token-file", token, "--metrics-listen", "127.0.0.1:0"], env, 2)
    agent = None
    try:
        address = re.search(r"listening on (\S+)", text).group(1)
        server_metrics = re.search(r"metrics: (\S+)", text).group(1)
        subprocess.run([*DRTOOL, "init", "vol", "--device", image], env=env, check=True, capture_output=True)
        subprocess.run([*DRTOOL, "protect", "vol", "--peer", f"http://{address}", "--token-file", token],
                       env=env, check=True, capture_output=True)
        agent, text = _start([*DRTOOL, "agent", "vol", "--nbd-socket", os.path.join(work, "nbd.sock"),
                              "--metrics-listen", "127.0.0.1:0"], env, 3)
        agent_metrics = re.search(r"metrics: (\S+)", text).group(1)
        token_header = f"Authorization: Bearer {'t0ken-' + 'x' * 26}"
        subjects = {
            "agent scrape": (agent.pid, ["curl", "-sf", agent_metrics]),
            "agent status --json": (agent.pid, [*DRTOOL, "status", "vol", "--json"]),
            "server scrape": (server.pid, ["curl", "-sf", server_metrics]),
            "server GET volume": (server.pid, ["curl", "-sf", "-H", token_header, f"http://{address}/v1/volumes/vol"]),
        }
        found: dict[str, list[float]] = {name: [] for name in subjects}
        for index in range(rounds):
            names = list(subjects) if index % 2 == 0 else list(reversed(subjects))
            for name in names:
                pid, argv = subjects[name]
                count = scrapes if argv[0] == "curl" else max(1, scrapes // 10)  # a CLI start is slow
                started = _process_cpu_seconds(pid)
                for _ in range(count):
                    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
                found[name].append((_process_cpu_seconds(pid) - started) / count * 1e3)
        return found
    finally:
        for proc in (agent, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2_000_000)
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"{os.getloadavg()[0]:.1f}; medians of {args.rounds} alternated rounds (min-max)")
    calls = per_call(args.rounds, args.calls)
    added = [c - p for c, p in zip(calls["counted"], calls["plain"])]
    print(row("per NBD request", "CPU µs per call"))
    print(row("---", "---"))
    for name, values in calls.items():
        print(row(f"export method, {name}", f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})"))
    print(row("added by @metrics.counted", f"{median(added):.3f} ({min(added):.3f}-{max(added):.3f})"))
    print()
    scrapes = per_scrape(args.rounds, args.scrapes)
    print(row("per request to the process", "its CPU ms per request"))
    print(row("---", "---"))
    for name, values in scrapes.items():
        print(row(name, f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
