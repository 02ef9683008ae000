"""drtool scrub throughput against b3sum on the same file (warm page cache).

    .venv/bin/python bench/scrub.py [--size 2G] [--runs 5]

Alternates `drtool scrub --json` (its own `seconds`) and `b3sum` (default
threads, wall clock) on one random image; reports medians and their ratio.  Two
rows: the scrub run by a fresh `drtool` process, and the same command answered by a
running `drtool agent` (the usual set-up on a primary: a long-lived process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import DRTOOL, median, parse_size, random_image, row, scratch_dir, timed, warm  # noqa: E402


def measure(env: dict, image: str, runs: int) -> dict:
    size = os.path.getsize(image)
    drtool_s, b3sum_s = [], []
    for _ in range(runs):
        out = subprocess.run([*DRTOOL, "scrub", "bench", "--json"], env=env, check=True,
                             capture_output=True).stdout
        drtool_s.append(json.loads(out)["seconds"])
        b3sum_s.append(timed(lambda: subprocess.run(["b3sum", image], check=True, stdout=subprocess.DEVNULL)))
    result = {"drtool_gbps": size / median(drtool_s) / 1e9, "b3sum_gbps": size / median(b3sum_s) / 1e9}
    result["ratio"] = result["drtool_gbps"] / result["b3sum_gbps"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="2G")
    parser.add_argument("--runs", type=int, default=5)
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
        rows = {"fresh process": measure(env, image, args.runs)}
        agent = subprocess.Popen([*DRTOOL, "agent", "bench", "--listen", "none", "--nbd-socket",
                                  os.path.join(work, "nbd.sock")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            if "serving" not in agent.stdout.readline():
                raise SystemExit("drtool agent did not start")
            rows["through the agent"] = measure(env, image, args.runs)
        finally:
            agent.terminate()
            agent.wait(timeout=60)
        for label, result in rows.items():
            print(row(f"scrub ({label})", f"{size >> 20} MiB", f"{result['drtool_gbps']:.2f} GB/s",
                      f"b3sum {result['b3sum_gbps']:.2f} GB/s", f"ratio {result['ratio']:.2f}"))
        return {"bytes": size, **rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
