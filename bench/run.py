"""`make bench`: every benchmark, one after another, rows printed as they come.

    .venv/bin/python bench/run.py [--quick]

--quick shrinks the sizes (for a smoke run); the numbers in docs/benchmarks.md come from
the full sizes.  Each benchmark can also be run alone (see its docstring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import agent, nbd_read, remote_fetch, replica_apply, replication, scale, scrub, writes  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write every result to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    plan = [
        ("scrub", lambda: scrub.main(["--size", "256M" if quick else "2G", "--runs", "2" if quick else "5"])),
        ("remote_fetch", lambda: remote_fetch.main(["--size", "256M" if quick else "1G",
                                                    "--runs", "2" if quick else "5"])),
        ("replication", lambda: replication.main(["--size", "128M" if quick else "1G",
                                                  "--runs", "1" if quick else "3"])),
        ("replica_apply", lambda: replica_apply.main(["--size", "128M" if quick else "1G"])),
        ("nbd_read", lambda: nbd_read.main(["--size", "256M" if quick else "2G", "--runs", "2" if quick else "5",
                                            "--fio-seconds", "2" if quick else "5", "--workers", "8"])),
        ("agent", lambda: agent.main(["--size", "256M" if quick else "2G", "--runs", "2" if quick else "5",
                                      "--fio-seconds", "2" if quick else "5"] + (["--skip-sparse"] if quick else []))),
        ("writes", lambda: writes.main(["--size", "256M" if quick else "1G", "--runs", "1" if quick else "3",
                                        "--fio-seconds", "3" if quick else "10",
                                        "--wire-ios", "2000" if quick else "20000"])),
        ("scale", lambda: scale.main(["--sizes", "1G,256G" if quick else "1G,256G,4T,15T",
                                      "--runs", "1" if quick else "3"])),
    ]
    results = {}
    for name, run in plan:
        print(f"\n== {name} ({time.strftime('%H:%M:%S')})", flush=True)
        results[name] = run()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
