"""Rich rendering for operators: status reports, the region map, progress bars.

Everything here reads plain dicts (the JSON the commands also print) and draws;
nothing here decides anything.
"""

from __future__ import annotations

import time
from typing import Any

from rich.cells import cell_len
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import (
    BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from drtool.units import format_bytes, format_duration, format_rate

HEALTH_STYLE = {"ONLINE": "bold green", "DEGRADED": "bold yellow", "FAULTED": "bold red"}
MODE_STYLE = {"normal": "green", "degraded": "yellow", "resync": "cyan"}
PROTECTION_STYLE = {"PROTECTED": "bold green", "LAGGING": "bold yellow", "UNPROTECTED": "bold red"}
#: cells a row of the region map holds in plain (piped) output
PLAIN_MAP_WIDTH = 64

# Region-map cell states, worst first: a cell shows the worst state among its regions.  A
# region the overlay holds is served from it: it shows as overlay, not as bad on the device.
CELL_STATES = [
    ("lost", "red", "█", "lost: bad, never replicated"),
    ("bad", "bright_red", "█", "bad on the device"),
    ("stale", "bright_red", "▚", "stale on the older local copy"),
    ("resync", "cyan", "▓", "waiting for failback"),
    ("overlay", "magenta", "▒", "in the overlay"),
    ("unreplicated", "yellow", "░", "not yet replicated"),
    ("ok", "green", "·", "healthy"),
]


class _RateColumn(ProgressColumn):
    """Throughput in the report's units (IEC, like every size drtool prints)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(format_rate(speed) if speed else "", style="progress.data.speed")


class _SizeColumn(ProgressColumn):
    """``done / total`` in IEC units, and what the bytes are (``copied``, ``checked``)."""

    def __init__(self, verb: str) -> None:
        super().__init__()
        self.verb = verb

    def render(self, task: Task) -> Text:
        total = format_bytes(task.total or 0)
        return Text(f"{format_bytes(task.completed)}/{total} {self.verb}", style="progress.download")


#: operations whose bytes include what was not read (holes of a sparse device are counted done
#: at once): their bar shows how much was checked, never a read rate
CHECKING = ("scrubbing", "scanning", "digesting")


class RichProgress:
    """A byte-counting progress bar on stderr that fits the terminal (80 columns and up) and
    clears itself when it stops."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def start(self, total: int, label: str) -> None:
        self.finish()
        checking = label.startswith(CHECKING)
        width = self._console.width
        room = max(12, width - (52 if checking else 64))  # what the other columns leave
        if len(label) > room:
            label = label[:room - 1] + "…"
        columns: list[ProgressColumn | str] = [
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=None if width > 120 else 16),
            _SizeColumn("checked" if checking else "done")]
        if not checking:
            columns.append(_RateColumn())
        columns.append(TimeRemainingColumn())
        self._progress = Progress(*columns, console=self._console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)

    def advance(self, amount: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def finish(self) -> None:
        """Stop; the bar leaves the screen (transient), whether the operation succeeded (the
        command prints its result next) or failed (its error is all that shows)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


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


def _minus(runs: list[list[int]], holes: list[list[int]]) -> list[tuple[int, int]]:
    """Runs with the regions of ``holes`` taken out (both sorted, not overlapping)."""
    out: list[tuple[int, int]] = []
    index = 0
    for first, count in runs:
        start, end = first, first + count
        while index < len(holes) and holes[index][0] + holes[index][1] <= start:
            index += 1
        probe = index
        while start < end and probe < len(holes) and holes[probe][0] < end:
            hole_start, hole_end = holes[probe][0], holes[probe][0] + holes[probe][1]
            if hole_start > start:
                out.append((start, hole_start - start))
            start = max(start, hole_end)
            probe += 1
        if start < end:
            out.append((start, end - start))
    return out


def region_cells(status: dict[str, Any], cells: int) -> list[str]:
    """The state of each map cell: ``cells`` groups of regions, each its worst state."""
    total = status["regions_total"]
    cells = max(1, min(cells, total))
    per_cell = -(-total // cells)
    cells = -(-total // per_cell)
    rank = {name: index for index, (name, *_rest) in enumerate(CELL_STATES)}
    worst = [rank["ok"]] * cells
    maps = dict(status["maps"])
    overlay = maps.get("overlay", [])
    # a FAULTED device serves no region, whatever the bad map recorded so far
    bad = [[0, total]] if status.get("faulted") else maps.get("bad", [])
    maps["bad"] = _minus(bad, overlay)
    maps["stale"] = status.get("stale_regions", [])
    for name, *_rest in CELL_STATES[:-1]:
        for first, count in maps.get(name, []):
            for cell in range(first // per_cell, (first + count - 1) // per_cell + 1):
                worst[cell] = min(worst[cell], rank[name])
    return [CELL_STATES[index][0] for index in worst]


def _legend_states(status: dict[str, Any], present: set[str]) -> list[tuple[str, str, str, str]]:
    always = {"ok", "bad"} | ({"overlay"} if status.get("mode") != "normal" else set())
    return [state for state in CELL_STATES if state[0] in present or state[0] in always]


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
    # The legend wraps between its entries, never inside one ("· / healthy" on two lines).
    legends = [Text(f"each cell = {per_cell} region{'s' if per_cell > 1 else ''}", style="dim")]
    for _name, color, glyph, meaning in _legend_states(status, set(states)):
        entry = Text()
        entry.append(glyph, style=color)
        entry.append(f" {meaning}", style="dim")
        if legends[-1].cell_len + 3 + entry.cell_len > columns:
            legends.append(entry)
        else:
            legends[-1].append("   ")
            legends[-1].append_text(entry)
    return Group(*lines, *legends)


def plain_region_map(status: dict[str, Any], columns: int, rows: int = 6) -> list[str]:
    """The region map as plain lines (fixed width; piped output)."""
    states = region_cells(status, columns * rows)
    per_cell = -(-status["regions_total"] // len(states))
    glyph = {name: g for name, _c, g, _m in CELL_STATES}
    lines = ["".join(glyph[s] for s in states[start:start + columns]) for start in range(0, len(states), columns)]
    legend = f"each cell = {per_cell} region{'s' if per_cell > 1 else ''}"
    legend += "".join(f"   {g} {meaning}" for _n, _c, g, meaning in _legend_states(status, set(states)))
    return lines + [legend]


def scrub_line(last: dict[str, Any] | None) -> str:
    if not last:
        return "none requested"
    when = _when(last["started"])
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
    error = (peer.get("error") or "").replace(f" to {peer['url']}", "")  # the URL is said once, in front
    return Text.assemble(peer["url"], " ", ("UNREACHABLE", "bold red"), f": {error}" if error else "")


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


def _status_rows(status: dict[str, Any]) -> list[tuple[str, Text | str]]:
    """The label/value rows of one volume's status, the same in the panel and in plain text."""
    rows: list[tuple[str, Text | str]] = []
    health = status["health"]
    rows.append(("volume", status["volume"]))
    rows.append(("health", Text(health, style=HEALTH_STYLE.get(health, ""))))
    state = status.get("protection")
    if state or status.get("role") != "secondary":
        reason = status.get("protection_reason") or ""
        if reason and reason in (status.get("status") or ""):
            reason = ""  # the status line below says it: once is enough
        rows.append(("protection", Text.assemble((state or "n/a", PROTECTION_STYLE.get(state or "", "")),
                                                 f" ({reason})" if reason and state != "PROTECTED" else "")))
    rows += _problem_rows(status)
    rows.append(("mode", Text(status["mode"], style=MODE_STYLE.get(status["mode"], ""))))
    rows.append(("role", status.get("role", "primary")))
    if status.get("group"):
        rows.append(("group", f"{status['group']} (swapped and protected with it: drtool status {status['group']})"))
    if status.get("direction"):
        rows.append(("replication to", status["direction"]))
    swap = status.get("last_swap")
    if swap:
        lost = swap.get("lost") or {}
        text = f"{swap['event']} at sequence {swap.get('seq')} on {_when(swap['time'])}"
        if lost.get("records") or lost.get("regions"):
            text += f"; lost {lost['records']} records ({format_bytes(lost['bytes'])})"
        elif swap["event"] == "takeover" and not lost:
            text += "; loss unknown until the old primary returns"
        rows.append(("last swap", Text(text, style="yellow" if "lost" in text or "unknown" in text else "")))
    if status.get("read_only"):
        rows.append(("writes", Text(f"refused: {status['read_only']}", style="yellow")))
    rows.append(("device", status["device"]))
    rows.append(("size", f"{format_bytes(status['size'])} ({status['size']} bytes)"))
    rows.append(("regions", f"{status['regions_total']} of {format_bytes(status['region_size'])}"))
    if status.get("faulted"):
        rows.append(("faulted", Text(str(status["faulted"]["reason"]), style="red")))
    bad = status["bad_count"]
    rows.append(("bad regions", Text(f"{bad} ({format_bytes(status['bad_bytes'])})", style="red" if bad else "green")))
    if bad and not status.get("faulted"):
        for line in _runs_text(status["bad_regions"], status["region_size"], status["size"]):
            rows.append(("", Text(line, style="red")))
    if status.get("stale_count"):
        rows.append(("stale regions", Text(f"{status['stale_count']} (written after the local copy's era: "
                                           "served from the replica)", style="red")))
    if status.get("lost_count"):
        rows.append(("lost regions", Text(str(status["lost_count"]), style="bold red")))
        for line in _runs_text(status["lost_regions"], status["region_size"], status["size"]):
            rows.append(("", Text(line, style="bold red")))
    overlay = status.get("overlay") or {}
    if overlay.get("regions"):
        rows.append(("overlay", f"{overlay['regions']} regions, {format_bytes(overlay['bytes'])}"))
    lag = status.get("lag")
    if lag and lag.get("summary") and status.get("peer"):
        rows.append(("replication", lag_text(lag)))
    peer = status.get("peer")
    if peer:
        rows.append(("peer", peer_text(peer)))
    if status.get("recovery"):
        rows.append(("recovery", recovery_text(status["recovery"])))
    if status.get("failback"):
        rows.append(("failback", failback_text(status["failback"])))
    rows.append(("era", str(status["era"])))
    rows.append(("scan", scrub_line(status.get("last_scrub"))))
    agent = status.get("agent") or {}
    rows.append(("agent", "running" if agent.get("running") else "not running"))
    return rows


def lag_text(lag: dict[str, Any]) -> str:
    """The lag in the report's units (IEC sizes), from the numbers engine/lag.py computed."""
    if lag.get("log_damage") or not (lag.get("records") or lag.get("regions")):
        return lag["summary"]
    text = (f"{lag['records']} records, {lag['regions']} regions, {format_bytes(lag['bytes'])} pending, "
            f"oldest {format_duration(lag.get('oldest_seconds') or 0.0)}")
    if lag.get("bitmap_mode"):
        text += f"; BITMAP MODE (log overflowed): {lag['bitmap_regions']} regions to ship from the volume"
    return text


def is_plain(console: Console) -> bool:
    """Piped or redirected: plain text, never wrapped, no boxes (scripts and grep read it)."""
    return not console.is_terminal


def render_status(console: Console, status: dict[str, Any]) -> None:
    rows = _status_rows(status)
    if is_plain(console):
        lines = [f"{label:>14}  {value if isinstance(value, str) else value.plain}" for label, value in rows]
        lines.append("")
        lines.extend(plain_region_map(status, PLAIN_MAP_WIDTH))
        console.out("\n".join(lines), highlight=False)
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right", no_wrap=True)
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    width = console.width  # the region map scales to the terminal
    console.print(Panel(Group(table, Text(""), region_map(status, width - 4)),
                        title=f"drtool status: {status['volume']}", width=width, expand=False))


# -- tables that fit the terminal: optional columns go before anything is truncated -------------

#: severity of a volume, worst first (report's sort order and its exit code)
def severity(status: dict[str, Any]) -> int:
    if status.get("health") == "FAULTED":
        return 0
    if status.get("lost_count"):
        return 1
    if status.get("health") == "DEGRADED":
        return 2
    if status.get("mode") not in (None, "normal"):
        return 3
    if status.get("protection") == "UNPROTECTED":
        return 4
    if status.get("protection") == "LAGGING":
        return 5
    return 6


def _fit_table(console: Console, title: str, columns: list[tuple[str, bool]],
               rows: list[list[Text | str]]) -> None:
    """Print a table of ``columns`` (name, optional).  Plain output: every column, aligned, no
    box, never wrapped.  A terminal: drop optional columns, last first, until it fits."""
    if is_plain(console):
        cells = [[c if isinstance(c, str) else c.plain for c in row] for row in rows]
        names = [name for name, _ in columns]
        widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(names)]
        lines = ["  ".join(n.upper().ljust(w) for n, w in zip(names, widths)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        console.out("\n".join(lines), highlight=False)
        return
    natural = [max([cell_len(name)] + [cell_len(row[i] if isinstance(row[i], str) else row[i].plain)
                                        for row in rows]) for i, (name, _) in enumerate(columns)]
    keep = list(range(len(columns)))
    optional = [i for i, (_, opt) in enumerate(columns) if opt]
    # each column: its cells, a space either side and a border; then the closing border
    while sum(natural[i] + 3 for i in keep) + 1 > console.width and optional:
        keep.remove(optional.pop())
    table = Table(title=title)
    for i in keep:
        table.add_column(columns[i][0], no_wrap=True, overflow="ellipsis", min_width=min(natural[i], 12))
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    console.print(table)


def _lag_cell(status: dict[str, Any]) -> str:
    lag = status.get("lag") or {}
    if not lag:
        return ""
    if lag.get("regions") or lag.get("records"):
        return f"{lag.get('regions', 0)} regions"
    return "in sync"


def render_summary(console: Console, statuses: list[dict[str, Any]], host: str | None = None) -> None:
    if not statuses:
        console.print("no volumes registered")
        return
    columns = [("volume", False), ("health", False), ("protection", False), ("mode", False),
               ("bad", True), ("lag", True), ("size", True), ("lost", True), ("role", True), ("era", True),
               ("device", True)]
    if host is not None:
        columns.insert(0, ("host", False))
    rows = []
    for status in statuses:
        health, state = status["health"], status.get("protection") or "n/a"
        rows.append([*((host,) if host is not None else ()),
                     status["volume"], Text(health, style=HEALTH_STYLE.get(health, "")),
                     Text(state, style=PROTECTION_STYLE.get(state, "")),
                     Text(status["mode"], style=MODE_STYLE.get(status["mode"], "")),
                     str(status["bad_count"]), _lag_cell(status), format_bytes(status["size"]),
                     str(status.get("lost_count", 0)), status.get("role", ""), str(status["era"]),
                     status["device"]])
    _fit_table(console, "drtool volumes", columns, rows)
    _problem_lines(console, [(status["volume"], status) for status in statuses])


def _problem_lines(console: Console, named: list[tuple[str, dict[str, Any]]]) -> None:
    """Under a table: each volume's status line and the action to take, one line each."""
    for name, status in named:
        if status.get("status"):
            line = f"{name}: {status['status']}" + (f"; action: {status['action']}" if status.get("action") else "")
            if is_plain(console):
                console.out(line, highlight=False)
            else:
                console.print(Text(line, style="yellow"))


def fleet_summary(hosts: dict[str, list[dict[str, Any]]]) -> str:
    """One line: how many volumes on how many hosts, by health and protection."""
    statuses = [s for v in hosts.values() for s in v]
    parts = [f"{sum(1 for s in statuses if s['health'] == h)} {h}" for h in ("FAULTED", "DEGRADED", "ONLINE")]
    prot = [f"{sum(1 for s in statuses if s.get('protection') == p)} {p}"
            for p in ("UNPROTECTED", "LAGGING", "PROTECTED")]
    lost = sum(s.get("lost_count", 0) for s in statuses)
    return (f"{len(statuses)} volume{'s' if len(statuses) != 1 else ''} on {len(hosts)} "
            f"host{'s' if len(hosts) != 1 else ''}: "
            + ", ".join(p for p in parts if not p.startswith("0 ")) + "; "
            + (", ".join(p for p in prot if not p.startswith("0 ")) or "no replication")
            + (f"; {lost} lost regions" if lost else ""))


def fleet_rows(hosts: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(host, status) worst first, then by host and volume."""
    pairs = [(host, s) for host, statuses in hosts.items() for s in statuses]
    return sorted(pairs, key=lambda p: (severity(p[1]), p[0], p[1]["volume"]))


def render_fleet(console: Console, hosts: dict[str, list[dict[str, Any]]], detail: bool = False) -> None:
    """One report for statuses gathered from many hosts: worst first, one summary line."""
    columns = [("host", False), ("volume", False), ("health", False), ("protection", False), ("mode", False),
               ("bad", True), ("lost", True), ("peer", True), ("role", True)]
    rows = []
    for host, status in fleet_rows(hosts):
        health, state = status["health"], status.get("protection") or "n/a"
        peer = status.get("peer") or {}
        reach = {True: "reachable", False: "UNREACHABLE"}.get(peer.get("reachable"), "")
        rows.append([host, status["volume"], Text(health, style=HEALTH_STYLE.get(health, "")),
                     Text(state, style=PROTECTION_STYLE.get(state, "")),
                     Text(status["mode"], style=MODE_STYLE.get(status["mode"], "")),
                     str(status["bad_count"]), str(status.get("lost_count", 0)),
                     f"{peer.get('url', '')} {reach}".strip(), status.get("role", "")])
    summary = fleet_summary(hosts)
    if is_plain(console):
        console.out(f"drtool fleet status: {summary}", highlight=False)
    else:
        console.print(Text(summary, style="bold"))
    _fit_table(console, "drtool fleet status", columns, rows)
    _problem_lines(console, [(f"{host}/{status['volume']}" if host else status["volume"], status)
                             for host, status in fleet_rows(hosts)])
    if detail:
        for _host, status in fleet_rows(hosts):
            render_status(console, status)


def render_replicas(console: Console, replicas: list[dict[str, Any]]) -> None:
    """The replicas a secondary host keeps (drtool status --replica-root)."""
    table = Table(title="drtool replicas (this host is the secondary)")
    for column in ("volume", "state", "size", "applied seq", "last record", "snapshots", "primary"):
        table.add_column(column)
    for info in replicas:
        last = info.get("last_record_at")
        when = _when(last) if last else "-"
        primary = info.get("primary") or {}
        table.add_row(info["name"], info.get("state", "replica"), format_bytes(info["size"]),
                      str(info.get("applied_seq")), when, str(len(info.get("snapshots") or [])),
                      primary.get("state", "active"))
    console.print(table)


def render_snapshots(console: Console, volume: str, snapshots: list[dict[str, Any]]) -> None:
    """drtool snapshot list: the replica's snapshots, oldest first."""
    if not snapshots:
        console.out(f"no snapshots of {volume}", highlight=False)
        return
    rows = [[snap["name"], _when(snap["created"]) if snap.get("created") else "-", str(snap.get("applied_seq", "")),
             str(snap.get("preserved_regions", ""))]
            for snap in sorted(snapshots, key=lambda s: s.get("created") or 0)]
    _fit_table(console, f"snapshots of {volume}", [("snapshot", False), ("created", False), ("sequence", False),
                                                   ("preserved regions", True)], rows)


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
    read = report["bytes_scanned"]
    # A sparse device's holes are proved zeros without a read: the rate is of the bytes read.
    rate = f", {format_rate(read / seconds)}" if read else ""
    console.print(
        f"  scrub: {report['regions_scanned']} regions verified in {format_duration(seconds)} "
        f"({format_bytes(read)} read{rate}), "
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


# -- consistency groups ---------------------------------------------------------------------------

CONSISTENT_STYLE = {True: "bold green", False: "bold red", None: ""}


def _consistent_text(group: dict[str, Any]) -> Text:
    consistent = group.get("consistent")
    word = {True: "yes", False: "NO", None: "n/a"}[consistent]
    reason = group.get("consistent_reason") or ""
    return Text.assemble((word, CONSISTENT_STYLE[consistent]), f" ({reason})" if reason and consistent is not True else "")


def _group_lag_text(group: dict[str, Any]) -> str:
    lag = group.get("lag") or {}
    if group.get("role") != "primary" or not lag:
        return lag.get("summary", "") if lag else ""
    text = lag_text(lag)
    if lag.get("oldest_member"):
        text += f" (the oldest on {lag['oldest_member']})"
    return text


def _group_rows(group: dict[str, Any]) -> list[tuple[str, Text | str]]:
    rows: list[tuple[str, Text | str]] = [("group", group["group"]),
                                          ("members", ", ".join(group["members"]))]
    health = group.get("health") or "n/a"
    rows.append(("health", Text(health, style=HEALTH_STYLE.get(health, ""))))
    state = group.get("protection")
    if state or group.get("role") != "secondary":
        reason = group.get("protection_reason") or ""
        rows.append(("protection", Text.assemble((state or "n/a", PROTECTION_STYLE.get(state or "", "")),
                                                 f" ({reason})" if reason and state not in ("PROTECTED", "UNPROTECTED")
                                                 else "")))
    rows.append(("consistent", _consistent_text(group)))
    if group.get("role") == "primary":
        rpo = group.get("rpo_seconds") or 0.0
        rows.append(("recovery point", "every acknowledged write is on the replica" if not rpo else
                     f"{format_duration(rpo)} behind (the oldest write not acknowledged)"))
        rows.append(("replication", _group_lag_text(group)))
    rows += _problem_rows(group)
    rows.append(("role", group.get("role") or "n/a"))
    if group.get("peer"):
        rows.append(("replica server", group["peer"]))
    return rows


def _member_table_rows(group: dict[str, Any]) -> list[list[Text | str]]:
    rows: list[list[Text | str]] = []
    for member in group.get("member_status") or []:
        if member.get("error"):
            rows.append([member["volume"], Text("?", style="red"), "", Text(member["error"], style="red"), "", ""])
            continue
        health, state = member.get("health") or "", member.get("protection") or "n/a"
        lag = member.get("lag") or {}
        pending = ("" if member.get("role") == "secondary" else
                   "in sync" if not (lag.get("records") or lag.get("regions")) else
                   f"{lag.get('records', 0)} records, {format_bytes(lag.get('bytes', 0))}, "
                   f"oldest {format_duration(lag.get('oldest_seconds') or 0.0)}"
                   + (", BITMAP" if lag.get("bitmap_mode") else ""))
        rows.append([member["volume"], Text(health, style=HEALTH_STYLE.get(health, "")),
                     Text(state, style=PROTECTION_STYLE.get(state, "")), pending,
                     Text(member.get("mode") or "", style=MODE_STYLE.get(member.get("mode") or "", "")),
                     member.get("role") or ""])
    return rows


MEMBER_COLUMNS = [("member", False), ("health", False), ("protection", False), ("lag", False), ("mode", True),
                  ("role", True)]


def render_group(console: Console, group: dict[str, Any]) -> None:
    """``drtool group status NAME``: the group, its recovery point, whether its replica is
    write-order consistent, what to do, and a line per member."""
    rows = _group_rows(group)
    if is_plain(console):
        lines = [f"{label:>14}  {value if isinstance(value, str) else value.plain}" for label, value in rows]
        console.out("\n".join(lines) + "\n", highlight=False)
        _fit_table(console, f"members of {group['group']}", MEMBER_COLUMNS, _member_table_rows(group))
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", justify="right", no_wrap=True)
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    console.print(Panel(table, title=f"drtool group status: {group['group']}", width=console.width, expand=False))
    _fit_table(console, f"members of {group['group']}", MEMBER_COLUMNS, _member_table_rows(group))


def render_groups(console: Console, groups: list[dict[str, Any]]) -> None:
    """Every group in one table (``drtool group status``, and under ``drtool status``)."""
    if not groups:
        console.print("no consistency groups defined")
        return
    columns = [("group", False), ("protection", False), ("consistent", False), ("lag", False),
               ("members", True), ("role", True)]
    rows: list[list[Text | str]] = []
    for group in groups:
        state = group.get("protection") or "n/a"
        lag = group.get("lag") or {}
        consistent = group.get("consistent")
        rows.append([group["group"], Text(state, style=PROTECTION_STYLE.get(state, "")),
                     Text({True: "yes", False: "NO", None: "n/a"}[consistent], style=CONSISTENT_STYLE[consistent]),
                     ("" if group.get("role") != "primary" else "in sync" if not (lag.get("records") or lag.get("regions"))
                      else f"{format_duration(group.get('rpo_seconds') or 0.0)}, {format_bytes(lag.get('bytes', 0))}"),
                     ", ".join(group["members"]), group.get("role") or ""])
    _fit_table(console, "drtool consistency groups", columns, rows)
    _problem_lines(console, [(f"group {group['group']}", group) for group in groups])


def _problem_rows(state: dict[str, Any]) -> list[tuple[str, Any]]:
    """What a volume's or a group's status object says is wrong and what to do: its first
    problem (status, action), then the others, one "also" row each."""
    rows: list[tuple[str, Any]] = []
    if state.get("status"):
        rows.append(("status", Text(state["status"], style="yellow")))
    if state.get("action"):
        rows.append(("action", Text(state["action"], style="bold")))
    for extra in (state.get("problems") or [])[1:]:
        rows.append(("also", extra["status"] + (f"; action: {extra['action']}" if extra.get("action") else "")))
    return rows
