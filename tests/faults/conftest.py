"""The fault suite's bookkeeping: every crash point, every input and every comparison is counted,
printed at the end of the run and written to ``fault-report.json`` in pytest's base temp
directory (or to ``$DRTOOL_FAULT_REPORT``), so docs/reliability.md can quote a real run."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

STATS = pytest.StashKey["FaultStats"]()


@dataclass
class FaultStats:
    started: float = field(default_factory=time.time)
    seeds: list[int] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    inputs: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)
    mismatches: int = 0

    def crash(self, **info: Any) -> None:
        self.crashes.append(info)

    def summary(self) -> dict[str, Any]:
        by = Counter(f"{c['phase']}/{c['target']}" for c in self.crashes)
        landed = Counter(f"{c['phase']}:{c.get('landed', '?')}" for c in self.crashes)
        return {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "seeds": self.seeds,
            "crash_points": len(self.crashes),
            "crash_points_by_phase_and_target": dict(sorted(by.items())),
            "crash_points_landed": dict(sorted(landed.items())),
            "inputs": dict(sorted(self.inputs.items())),
            "checks": dict(sorted(self.checks.items())),
            "mismatches": self.mismatches,
            "crashes": self.crashes,
        }


@pytest.fixture(scope="session")
def fault_stats(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FaultStats:
    stats = request.config.stash.setdefault(STATS, FaultStats())
    yield stats
    target = os.environ.get("DRTOOL_FAULT_REPORT") or str(tmp_path_factory.getbasetemp() / "fault-report.json")
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(stats.summary(), handle, indent=1, sort_keys=True)
        handle.write("\n")
    request.config.stash[STATS] = stats


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    stats = config.stash.get(STATS, None)
    if stats is None or not stats.crashes:
        return
    summary = stats.summary()
    write = terminalreporter.write_line
    terminalreporter.section("drtool fault suite (kill -9)")
    write(f"seeds {summary['seeds']}; {summary['crash_points']} crash points: "
          f"{summary['crash_points_by_phase_and_target']}")
    write(f"where they landed: {summary['crash_points_landed']}")
    write(f"inputs: {summary['inputs']}")
    write(f"checks: {summary['checks']}")
    write(f"mismatches: {summary['mismatches']}")
