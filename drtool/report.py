"""Rich rendering for operators: status reports, the region map, progress bars.

Everything here reads plain dicts (the JSON the commands also print) and draws;
nothing here decides anything.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from drtool.units import format_bytes, format_duration, format_rate

HEALTH_STYLE = {"ONLINE": "bold green", "DEGRADED": "bold yellow", "FAULTED": "bold red"}
MODE_STYLE = {"normal": "green", "degraded": "yellow", "resync": "cyan"}

# Region-map cell states, worst first: a cell shows the worst state among its regions.
CELL_STATES = [
    ("lost", "red", "█", "lost: bad, never replicated"),
    ("bad", "bright_red", "█", "bad on the device"),
    ("resync", "cyan", "▓", "waiting for failback"),
    ("overlay", "magenta", "▒", "in the overlay"),
    ("unreplicated", "yellow", "░", "not yet replicated"),
    ("ok", "green", "·", "healthy"),
]


class RichProgress:
    """A byte-counting progress bar (bytes, throughput, ETA) on stderr."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self._task: TaskID | None = None

    def start(self, total: int, label: str) -> None:
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def finish(self) -> None:
        self._progress.stop()


def _runs_text(runs: list[list[int]], region_size: int, size: int, limit: int = 12) -> list[str]:
    lines = []
    for first, count in runs[:limit]:
        offset = first * region_size
        length = min((first + count) * region_size, size) - offset
        label = f"region {first}" if count == 1 else f"regions {first}-{first + count - 1}"
        lines.append(f"{label}: offset {format_bytes(offset)} ({offset}), {format_bytes(length)}")
    if len(runs) > limit:
        lines.append(f"... and {len(runs) - limit} more runs")
    return lines


def region_cells(status: dict[str, Any], cells: int) -> list[str]:
    """The state of each map cell: ``cells`` groups of regions, each its worst state."""
    total = status["regions_total"]
    cells = max(1, min(cells, total))
    per_cell = -(-total // cells)
    cells = -(-total // per_cell)
    rank = {name: index for index, (name, *_rest) in enumerate(CELL_STATES)}
    worst = [rank["ok"]] * cells
    for name, *_rest in CELL_STATES[:-1]:
        for first, count in status["maps"].get(name, []):
            for cell in range(first // per_cell, (first + count - 1) // per_cell + 1):
                worst[cell] = min(worst[cell], rank[name])
    return [CELL_STATES[index][0] for index in worst]


def region_map(status: dict[str, Any], width: int, rows: int = 6) -> Group:
    columns = max(8, width - 4)
    states = region_cells(status, columns * rows)
    per_cell = -(-status["regions_total"] // len(states))
    style = {name: (color, glyph) for name, color, glyph, _ in CELL_STATES}
    lines = []
    for start in range(0, len(states), columns):
        line = Text()
        for state in states[start:start + columns]:
            color, glyph = style[state]
            line.append(glyph, style=color)
        lines.append(line)
    legend = Text(f"each cell = {per_cell} region{'s' if per_cell > 1 else ''}   ", style="dim")
    present = set(states)
    for name, color, glyph, meaning in CELL_STATES:
        if name in present or name in ("ok", "bad"):
            legend.append(glyph, style=color)
            legend.append(f" {meaning}   ", style="dim")
    return Group(*lines, legend)


def scrub_line(last: dict[str, Any] | None) -> str:
    if not last:
        return "none requested"
    when = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(last["started"]))
    if last.get("faulted"):
        return f"scrub could not read the device on {when}: {last['faulted']}"
    seconds = last["seconds"] or 1e-9
    errors = last.get("errors", {})
    parts = [f"{errors[k]} {k}" for k in ("checksum", "io-error", "short-read") if errors.get(k)]
    detail = f" ({', '.join(parts)})" if parts else ""
    return (f"scrub scanned {format_bytes(last['bytes'])} in {format_duration(seconds)} "
            f"({format_rate(last['bytes'] / seconds)}) with {last['bad_count']} bad regions{detail} on {when}")


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def peer_text(peer: dict[str, Any]) -> Text:
    text = _peer_reach(peer)
    if peer.get("insecure"):
        text.append("  INSECURE: not encrypted (--insecure)", style="bold yellow")
    return text


def _peer_reach(peer: dict[str, Any]) -> Text:
    reachable = peer.get("reachable")
    if reachable is None:
        return Text(f"{peer['url']} (not probed)")
    if reachable:
        return Text.assemble(peer["url"], " ", ("reachable", "green"))
    return Text.assemble(peer["url"], " ", ("UNREACHABLE", "bold red"),
                         f": {peer['error']}" if peer.get("error") else "")


def recovery_text(recovery: dict[str, Any]) -> str:
    source = recovery.get("source") or "mirror"
    if recovery.get("local_era") is not None:
        source += f", local copy from era {recovery['local_era']}"
    how = "automatically" if recovery.get("auto") else "by the operator"
    fetched = recovery.get("fetched_regions", 0)
    return (f"since {_when(recovery['entered'])}, entered {how}: {recovery.get('reason', '')}; "
            f"source {source}; fetched {fetched} region{'' if fetched == 1 else 's'} "
            f"({format_bytes(recovery.get('fetched_bytes', 0))}) from the replica")


def failback_text(failback: dict[str, Any]) -> str:
    total = failback.get("total_regions", 0)
    done = failback.get("done_regions", 0)
    copied = format_bytes(failback.get("bytes_copied", 0))
    if failback.get("finished"):
        return (f"finished {_when(failback['finished'])}: {done} of {total} regions copied "
                f"({copied}) onto {failback.get('device')}")
    percent = 100.0 * done / total if total else 100.0
    return (f"running since {_when(failback['started'])}: {done} of {total} regions ({percent:.0f} %), "
            f"{copied} copied onto {failback.get('device')}")


def render_status(console: Console, status: dict[str, Any]) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right")
    table.add_column()
    health = status["health"]
    table.add_row("volume", status["volume"])
    table.add_row("health", Text(health, style=HEALTH_STYLE.get(health, "")))
    table.add_row("mode", Text(status["mode"], style=MODE_STYLE.get(status["mode"], "")))
    table.add_row("role", status.get("role", "primary"))
    if status.get("direction"):
        table.add_row("replication to", status["direction"])
    swap = status.get("last_swap")
    if swap:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(swap["time"]))
        lost = swap.get("lost") or {}
        text = f"{swap['event']} at sequence {swap.get('seq')} on {when}"
        if lost.get("records") or lost.get("regions"):
            text += f"; lost {lost['records']} records ({format_bytes(lost['bytes'])})"
        elif swap["event"] == "takeover" and not lost:
            text += "; loss unknown until the old primary returns"
        table.add_row("last swap", Text(text, style="yellow" if "lost" in text or "unknown" in text else ""))
    if status.get("read_only"):
        table.add_row("writes", Text(f"refused: {status['read_only']}", style="yellow"))
    table.add_row("device", status["device"])
    table.add_row("size", f"{format_bytes(status['size'])} ({status['size']} bytes)")
    table.add_row("regions", f"{status['regions_total']} of {format_bytes(status['region_size'])}")
    if status.get("faulted"):
        table.add_row("faulted", Text(status["faulted"]["reason"], style="red"))
    bad = status["bad_count"]
    bad_text = Text(f"{bad} ({format_bytes(status['bad_bytes'])})", style="red" if bad else "green")
    table.add_row("bad regions", bad_text)
    if bad and not status.get("faulted"):
        for line in _runs_text(status["bad_regions"], status["region_size"], status["size"]):
            table.add_row("", Text(line, style="red"))
    if status.get("lost_count"):
        table.add_row("lost regions", Text(str(status["lost_count"]), style="bold red"))
        for line in _runs_text(status["lost_regions"], status["region_size"], status["size"]):
            table.add_row("", Text(line, style="bold red"))
    overlay = status.get("overlay") or {}
    if overlay.get("regions"):
        table.add_row("overlay", f"{overlay['regions']} regions, {format_bytes(overlay['bytes'])}")
    lag = status.get("lag")
    if lag and lag.get("summary"):
        table.add_row("replication", lag["summary"])
    peer = status.get("peer")
    if peer:
        table.add_row("peer", peer_text(peer))
    if status.get("recovery"):
        table.add_row("recovery", recovery_text(status["recovery"]))
    if status.get("failback"):
        table.add_row("failback", failback_text(status["failback"]))
    table.add_row("era", str(status["era"]))
    table.add_row("scan", scrub_line(status.get("last_scrub")))
    agent = status.get("agent") or {}
    table.add_row("agent", "running" if agent.get("running") else "not running")
    width = console.width  # the region map scales to the terminal
    console.print(Panel(Group(table, Text(""), region_map(status, width - 4)),
                        title=f"drtool status: {status['volume']}", width=width, expand=False))


def render_summary(console: Console, statuses: list[dict[str, Any]], host: str | None = None) -> None:
    if not statuses:
        console.print("no volumes registered")
        return
    table = Table(title="drtool volumes")
    columns = ("host",) if host is not None else ()
    for column in (*columns, "volume", "health", "mode", "role", "size", "bad", "lost", "lag", "era", "device"):
        table.add_column(column, no_wrap=column != "device", overflow="fold")
    for status in statuses:
        health = status["health"]
        lag_info = status.get("lag") or {}
        lag = f"{lag_info['regions']} regions" if lag_info.get("regions") else ("in sync" if lag_info else "")
        table.add_row(
            *((host,) if host is not None else ()),
            status["volume"], Text(health, style=HEALTH_STYLE.get(health, "")),
            Text(status["mode"], style=MODE_STYLE.get(status["mode"], "")), status.get("role", ""),
            format_bytes(status["size"]), str(status["bad_count"]), str(status.get("lost_count", 0)),
            lag, str(status["era"]), status["device"],
        )
    console.print(table)


def render_fleet(console: Console, hosts: dict[str, list[dict[str, Any]]], detail: bool = False) -> None:
    """One report for statuses gathered from many hosts."""
    table = Table(title="drtool fleet status")
    for column in ("host", "volume", "health", "mode", "role", "bad", "lost", "replication", "peer"):
        table.add_column(column)
    for host, statuses in sorted(hosts.items()):
        for status in statuses:
            health = status["health"]
            peer = status.get("peer") or {}
            reach = {True: "reachable", False: "UNREACHABLE"}.get(peer.get("reachable"), "")
            table.add_row(host, status["volume"], Text(health, style=HEALTH_STYLE.get(health, "")),
                          Text(status["mode"], style=MODE_STYLE.get(status["mode"], "")),
                          status.get("role", ""), str(status["bad_count"]), str(status.get("lost_count", 0)),
                          (status.get("lag") or {}).get("summary", ""),
                          f"{peer.get('url', '')} {reach}".strip())
    console.print(table)
    if detail:
        for statuses in hosts.values():
            for status in statuses:
                render_status(console, status)


def render_replicas(console: Console, replicas: list[dict[str, Any]]) -> None:
    """The replicas a secondary host keeps (drtool status --replica-root)."""
    table = Table(title="drtool replicas (this host is the secondary)")
    for column in ("volume", "state", "size", "applied seq", "last record", "snapshots", "primary"):
        table.add_column(column)
    for info in replicas:
        last = info.get("last_record_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "-"
        primary = info.get("primary") or {}
        table.add_row(info["name"], info.get("state", "replica"), format_bytes(info["size"]),
                      str(info.get("applied_seq")), when, str(len(info.get("snapshots") or [])),
                      primary.get("state", "active"))
    console.print(table)


def render_scrub(console: Console, report: dict[str, Any]) -> None:
    health = report["health"]
    console.print(Text.assemble(("volume ", "bold"), report["volume"], "  ",
                                (health, HEALTH_STYLE.get(health, ""))))
    if report.get("faulted"):
        console.print(Text(f"  scrub: device unusable: {report['faulted']}", style="red"))
        return
    seconds = report["seconds"] or 1e-9
    errors = report["errors"]
    parts = [f"{errors[k]} {k}" for k in ("checksum", "io-error", "short-read") if errors.get(k)]
    console.print(
        f"  scrub: {format_bytes(report['bytes_scanned'])} read, {report['regions_scanned']} regions "
        f"verified in {format_duration(seconds)} ({format_rate(report['bytes_scanned'] / seconds)}), "
        f"{report['bad_count']} bad regions" + (f" ({', '.join(parts)})" if parts else "")
    )
    size = report["regions_total"] * report["region_size"]
    for line in _runs_text(report["bad_regions"], report["region_size"], size):
        console.print(Text(f"    {line}", style="red"))
    if report["cleared_regions"]:
        total = sum(n for _, n in report["cleared_regions"])
        console.print(Text(f"  {total} regions verified clean again and left the bad map", style="green"))
    if report.get("skipped_overlay_regions"):
        console.print(f"  {report['skipped_overlay_regions']} regions live in the overlay (device copy not checked)")


def render_scan(console: Console, report: dict[str, Any], region_size: int | None = None) -> None:
    changed = report["changed_count"]
    console.print(f"scan of {report['volume']}: {changed} regions changed outside drtool, "
                  f"accepted in era {report['era']}")
    for first, count in report["changed_regions"][:20]:
        console.print(f"  regions {first}-{first + count - 1}" if count > 1 else f"  region {first}")
    if report["unreadable_regions"]:
        total = sum(n for _, n in report["unreadable_regions"])
        console.print(Text(f"  {total} regions could not be read and stay bad", style="red"))
    if report.get("cleared_regions"):
        total = sum(n for _, n in report["cleared_regions"])
        console.print(Text(f"  {total} bad regions hold their expected bytes again and left the bad map",
                           style="green"))


VERIFY_STYLE = {"equal": "green", "pending": "yellow", "differ": "bold red"}


def render_verify(console: Console, report: dict[str, Any]) -> None:
    """``drtool verify``: what the replica holds compared with the manifest, region runs by reason."""
    result = report["result"]
    seconds = report.get("seconds") or 1e-9
    console.print(Text.assemble(("volume ", "bold"), report["volume"], "  replica ", (result.upper(),
                                VERIFY_STYLE.get(result, ""))))
    console.print(f"  verify of the {report['source']} on {report['peer']}"
                  f"{' (resumed)' if report.get('resumed') else ''}: {report['regions_compared']} of "
                  f"{report['regions_total']} regions compared (the rest are zeros on both sides), "
                  f"{format_bytes(report['bytes_read'])} read on the replica in {format_duration(seconds)}"
                  f" ({format_rate(report['bytes_read'] / seconds)})")
    region_size = report["region_size"]
    size = (max((a + n for a, n in report["regions"]), default=0)) * region_size
    for key, label, style in (("replica_rot", "replica rot (its bytes fail its own digest)", "red"),
                              ("divergent", "divergent (acknowledged, yet other bytes than the manifest)", "red"),
                              ("pending", "pending (not replicated yet)", "yellow")):
        runs = report.get(key) or []
        if runs:
            console.print(Text(f"  {sum(n for _, n in runs)} regions {label}:", style=style))
            for line in _runs_text(runs, region_size, size):
                console.print(Text(f"    {line}", style=style))
    repair = report.get("repair")
    if repair:
        relogged = sum(n for _, n in repair["relogged"])
        console.print(f"  repair: {relogged} regions shipped again, {repair['regions_checked']} verified again: "
                      f"{repair['result']}")
        if repair["unrepairable"]:
            console.print(Text(f"  not repairable from this side (no verified copy here): "
                               f"{repair['unrepairable']}", style="red"))
        for line in _runs_text(repair["after"]["replica_rot"] + repair["after"]["divergent"], region_size, size):
            console.print(Text(f"    still differs: {line}", style="red"))
    elif result == "differ":
        console.print("  run drtool verify --repair to ship these regions again")
