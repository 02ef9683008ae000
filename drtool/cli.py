"""The ``drtool`` command line: parse, call drtool.api, render.  No logic lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console

from drtool import __version__, api, report
from drtool.errors import DrtoolError, ExitCode, StateError, UsageError
from drtool.progress import NoProgress, Progress
from drtool.regions import format_runs
from drtool.units import format_bytes, parse_size


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() stays callable."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


class Context:
    def __init__(self, args: argparse.Namespace, stdout: Any, stderr: Any) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        self.out = Console(file=stdout, highlight=False, soft_wrap=False)
        self.err = Console(file=stderr, highlight=False)
        self.stdout = stdout

    @property
    def root(self) -> str | None:
        return self.args.state_root

    def progress(self) -> Progress:
        if self.json or not self.err.is_terminal:
            return NoProgress()
        return report.RichProgress(self.err)

    def emit_json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# -- commands -------------------------------------------------------------------------


def cmd_init(ctx: Context) -> int:
    a = ctx.args
    result = api.init_volume(a.name, a.device, a.region_size, force=a.force, root=ctx.root,
                             progress=ctx.progress())
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.out.print(f"volume {result['volume']} registered: {result['regions_total']} regions of "
                      f"{result['region_size']} bytes on {result['device']} (era {result['era']})")
    return ExitCode.OK


def cmd_scrub(ctx: Context) -> int:
    result = api.scrub_volume(ctx.args.name, root=ctx.root, progress=ctx.progress())
    if ctx.json:
        ctx.emit_json(result)
    else:
        report.render_scrub(ctx.out, result)
    if result["faulted"]:
        return ExitCode.FAULTED
    return ExitCode.BAD_REGIONS if result["bad_count"] else ExitCode.OK


def cmd_scan(ctx: Context) -> int:
    result = api.scan_volume(ctx.args.name, root=ctx.root, progress=ctx.progress())
    if ctx.json:
        ctx.emit_json(result)
    else:
        report.render_scan(ctx.out, result)
    return ExitCode.OK


def cmd_checkpoint(ctx: Context) -> int:
    result = api.checkpoint(ctx.args.name, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.out.print(result["era"])
    return ExitCode.OK


def cmd_upgrade(ctx: Context) -> int:
    result = api.upgrade(ctx.args.name, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    elif result["changed"]:
        what = f"converted from the {result['from']}" if result["from"] else "finished an interrupted upgrade"
        ctx.out.print(f"volume {result['volume']}: state {what}; removed {', '.join(result['removed']) or 'nothing'}")
    else:
        ctx.out.print(f"volume {result['volume']}: state is already in the current format")
    return ExitCode.OK


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise UsageError(f"expected on or off, not {value!r}")
    return value == "on"


def cmd_configure(ctx: Context) -> int:
    a = ctx.args
    changes: dict[str, Any] = {}
    if a.copy_on_read is not None:
        changes["copy_on_read"] = _on_off(a.copy_on_read)
    if a.auto_degrade is not None:
        changes["auto_degrade"] = _on_off(a.auto_degrade)
    if a.log_limit is not None:
        changes["log_limit"] = parse_size(a.log_limit, "--log-limit")
    if a.fetch_timeout is not None:
        changes["fetch_timeout"] = a.fetch_timeout
    result = api.configure(a.name, changes, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
        return ExitCode.OK
    settings = result["settings"]
    ctx.out.print(f"volume {result['volume']}{' (changed)' if result['changed'] else ''}: "
                  f"copy-on-read {'on' if settings['copy_on_read'] else 'off'}, "
                  f"auto-degrade {'on' if settings['auto_degrade'] else 'off'}, "
                  f"log limit {format_bytes(settings['log_limit'])}, fetch timeout {settings['fetch_timeout']:g}s")
    return ExitCode.OK


def cmd_report(ctx: Context) -> int:
    """Render status JSON gathered elsewhere (e.g. by playbooks/status.yml) as one report.

    Exit code by the worst volume: 4 FAULTED, 3 DEGRADED (or lost regions), 7 replication
    broken (a paired volume UNPROTECTED), else 0."""
    path = ctx.args.file
    try:
        raw = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        gathered = json.loads(raw)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    hosts, code = api.fleet_report(gathered, source=path)
    if ctx.json:
        ctx.emit_json(hosts)
    else:
        report.render_fleet(ctx.out, hosts, detail=ctx.args.detail)
    return code


def cmd_status(ctx: Context) -> int:
    if ctx.args.replica_root:
        replicas = api.replica_status(ctx.args.replica_root)
        if ctx.json:
            ctx.emit_json(replicas)
        else:
            report.render_replicas(ctx.out, replicas)
        return ExitCode.OK
    _check_readable_root(ctx.root)
    if ctx.args.name and api.is_group(ctx.args.name, root=ctx.root):
        return _group_status(ctx, ctx.args.name)
    statuses = api.status(ctx.args.name, root=ctx.root, attention_only=ctx.args.x)
    if ctx.args.x:
        # Like zpool status -x: only the volumes that need attention.
        if not statuses and not ctx.json:
            ctx.out.print("all volumes are healthy and protected" if not ctx.args.name
                          else f"volume {ctx.args.name} is healthy and protected")
            return ExitCode.OK
    if ctx.json:
        ctx.emit_json(statuses[0] if ctx.args.name and statuses else (None if ctx.args.name else statuses))
    elif ctx.args.name:
        report.render_status(ctx.out, statuses[0])
    else:
        report.render_summary(ctx.out, statuses)
        try:
            groups = api.group_status(root=ctx.root)
        except DrtoolError as exc:  # the volumes above stand on their own
            ctx.err.print(f"[red]consistency groups: {exc}[/red]")
            return ExitCode.OK
        if ctx.args.x:
            groups = [g for g in groups if g.get("attention")]
        if groups:
            ctx.out.print("")
            report.render_groups(ctx.out, groups)
    return ExitCode.OK


def _group_status(ctx: Context, name: str | None) -> int:
    """``drtool status GROUP`` and ``drtool group status [NAME]`` (docs/status.md, groups)."""
    result = api.group_status(name, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    elif isinstance(result, dict):
        report.render_group(ctx.out, result)
    else:
        report.render_groups(ctx.out, result)
    return ExitCode.OK


def cmd_group_status(ctx: Context) -> int:
    _check_readable_root(ctx.root)
    return _group_status(ctx, ctx.args.name)


def _say_group(ctx: Context, result: dict, what: Callable[[str, dict], str]) -> None:
    """One line per member of a group's role swap, then the group's."""
    for member, each in result["members"].items():
        ctx.out.print(what(member, each))


def _plan_text(plan: dict) -> str:
    if plan["mode"] == "incremental":
        lost = plan.get("lost") or {}
        text = (f"fast failback: {plan['regions']} regions ({format_bytes(plan['bytes'])}) to copy, "
                f"{plan.get('divergent', 0)} of them divergent on the peer")
        if lost.get("records"):
            text += f"; the peer lost {lost['records']} records ({format_bytes(lost['bytes'])}) at the takeover"
        return text
    if plan["mode"] == "resume":
        return f"resuming: {plan['regions']} regions left to copy"
    return f"full sync: {plan['regions']} regions ({format_bytes(plan['bytes'])}) to copy"


def cmd_protect(ctx: Context) -> int:
    a = ctx.args
    if api.is_group(a.name, root=ctx.root):
        return _protect_group(ctx)
    if not ctx.json:
        # The plan is known only once the peer answered; show it before the copying starts:
        # with --plan it is the answer (stdout), else a note before the work (stderr).
        plan = api.protect(a.name, a.peer, a.token_file, a.ca, root=ctx.root, plan_only=True,
                           insecure=a.insecure)["plan"]
        if a.plan:
            ctx.stdout.write(_plan_text(plan) + "\n")
            return ExitCode.OK
        ctx.err.print(_plan_text(plan))
    result = api.protect(a.name, a.peer, a.token_file, a.ca, root=ctx.root, progress=ctx.progress(),
                         plan_only=a.plan, insecure=a.insecure)
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.out.print(f"volume {a.name} protected by {result['peer']}: {result['regions_synced']} regions "
                      f"synced, {result['records_shipped']} records shipped")
    return ExitCode.OK


def _protect_group(ctx: Context) -> int:
    a = ctx.args
    result = api.protect(a.name, a.peer, a.token_file, a.ca, root=ctx.root, progress=ctx.progress(),
                         plan_only=a.plan, insecure=a.insecure)
    if ctx.json:
        ctx.emit_json(result)
        return ExitCode.OK
    for member, each in result["members"].items():
        plan = each.get("plan") or {}
        text = "in sync" if plan.get("mode") == "in sync" else _plan_text(plan) if plan else ""
        if not a.plan and "regions_synced" in each:
            text += f": {each['regions_synced']} regions synced, {each['records_shipped']} records shipped"
        ctx.out.print(f"  {member}: {text}")
    if not a.plan:
        ctx.out.print(f"group {a.name} protected by {result['peer']}: its volumes replicate as one")
    return ExitCode.OK


def cmd_group(ctx: Context) -> int:
    """drtool group create|add|remove|delete: the group's definition (docs/operations.md)."""
    a = ctx.args
    if a.action == "create":
        result = api.group_create(a.name, a.volumes, root=ctx.root)
        text = (f"group {a.name} created: {', '.join(result['members'])}"
                + ("; it replicates as one" if result["protected"] else
                   f"; protect it with drtool protect {a.name} --peer URL"))
    elif a.action == "add":
        result = api.group_add(a.name, a.volumes, root=ctx.root)
        text = (f"group {a.name}: added {', '.join(result['added'])}" if result["added"]
                else f"group {a.name}: nothing to add") + f"; members {', '.join(result['members'])}"
    elif a.action == "remove":
        result = api.group_remove(a.name, a.volumes, root=ctx.root)
        text = (f"group {a.name}: removed {', '.join(result['removed'])} (each replicates alone now)"
                if result["removed"] else f"group {a.name}: nothing to remove")
    else:
        result = api.group_delete(a.name, root=ctx.root)
        text = f"group {a.name} deleted" if result["changed"] else f"there is no group {a.name}"
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.out.print(text)
    return ExitCode.OK


def cmd_snapshot(ctx: Context) -> int:
    """Snapshots of a replica on the secondary's replica server (docs/api.md, Snapshots)."""
    a = ctx.args
    result = api.snapshot(a.action, a.name, getattr(a, "snapshot", None), replica_url=a.replica_url,
                          token_file=a.token_file, ca=a.ca, insecure=a.insecure, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    elif "group" in result:
        if a.action == "create":
            ctx.stdout.write(f"snapshot {a.snapshot} of group {a.name} ({', '.join(result['members'])}) created "
                             f"on {result['replica_url']} at one consistent point\n")
        elif a.action == "delete":
            ctx.stdout.write(f"snapshot {result['deleted']} of group {a.name} deleted on {result['replica_url']} "
                             f"({', '.join(result['members'])})\n")
        else:
            for member, snaps in result["members"].items():
                report.render_snapshots(ctx.out, member, snaps)
    elif a.action == "create":
        snap = result["snapshot"]
        ctx.stdout.write(f"snapshot {snap['name']} of {a.name} created on {result['replica_url']} at sequence "
                         f"{snap.get('applied_seq')}\n")
    elif a.action == "delete":
        ctx.stdout.write(f"snapshot {result['deleted']} of {a.name} deleted on {result['replica_url']}\n")
    else:
        report.render_snapshots(ctx.out, a.name, result["snapshots"])
    return ExitCode.OK


def cmd_demote(ctx: Context) -> int:
    a = ctx.args
    result = api.demote(a.name, timeout=a.timeout, force=a.force, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    elif "group" in result:
        _say_group(ctx, result, lambda m, r: f"volume {m}: " + (
            "already the secondary here" if not r["changed"] else
            f"demoted at era {r['demoted']['era']}, sequence {r['demoted']['seq']}"))
        lost = result["lost"]
        ctx.out.print(f"group {a.name} demoted: primary role handed over" if result["changed"]
                      else f"group {a.name} is already the secondary here")
        if lost.get("records") or lost.get("regions"):
            for member, each in result["members"].items():
                mlost = (each.get("demoted") or {}).get("lost") or {}
                if mlost.get("records") or mlost.get("regions"):
                    ctx.err.print(f"[red]lost on {member}: {mlost['records']} records, {format_bytes(mlost['bytes'])} "
                                  f"in {mlost['regions']} regions[/red]")
            ctx.err.print(f"[red]lost in group {a.name}: {lost['records']} records, {format_bytes(lost['bytes'])} "
                          f"in {lost['regions']} regions never reached the new primary[/red]")
    elif not result["changed"]:
        ctx.out.print(f"volume {a.name} is already the secondary here")
    else:
        demoted = result["demoted"]
        lost = demoted["lost"]
        ctx.out.print(f"volume {a.name} demoted at era {demoted['era']}, sequence {demoted['seq']}; "
                      f"primary role handed to {demoted['peer']}")
        if lost.get("records") or lost.get("regions"):
            ctx.err.print(f"[red]lost: {lost['records']} records, {format_bytes(lost['bytes'])} in "
                          f"{lost['regions']} regions never reached the new primary[/red]")
    return ExitCode.OK


def cmd_adopt(ctx: Context) -> int:
    a = ctx.args
    result = api.adopt(a.name, a.replica_url, a.token_file, a.ca, root=ctx.root, insecure=a.insecure,
                       force=a.force)
    if ctx.json:
        ctx.emit_json(result)
    elif "group" in result:
        for member, each in result["members"].items():
            verb = "now served" if each["changed"] else "already served"
            ctx.out.print(f"volume {member} of group {a.name} is {verb} as a replica by {a.replica_url}")
            _say_disconnected(ctx, member, each.get("disconnected"))
    else:
        verb = "now served" if result["changed"] else "already served"
        left = "; the agent no longer serves it" if result["left_agent"] else ""
        ctx.out.print(f"volume {a.name} is {verb} as a replica by {a.replica_url}{left}")
        _say_disconnected(ctx, a.name, result.get("disconnected"))
    return ExitCode.OK


def _say_disconnected(ctx: Context, name: str, peers: list[str] | None) -> None:
    if peers:
        ctx.err.print(f"[yellow]disconnected the NBD clients of {name}: {', '.join(peers)}[/yellow]")


def cmd_attach(ctx: Context) -> int:
    a = ctx.args
    result = api.attach(a.name, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        verb = "now serves" if result["changed"] else "already serves"
        ctx.stdout.write(f"the agent {verb} {a.name}: {'  '.join(result['uris'])}\n")
    return ExitCode.OK


def cmd_detach(ctx: Context) -> int:
    a = ctx.args
    result = api.detach(a.name, force=a.force, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        verb = "no longer serves" if result["changed"] else "does not serve"
        ctx.stdout.write(f"the agent {verb} {a.name}\n")
        _say_disconnected(ctx, a.name, result.get("disconnected"))
    return ExitCode.OK


def cmd_promote(ctx: Context) -> int:
    a = ctx.args
    result = api.promote(a.name, a.replica_url, a.token_file, a.ca, force=a.force, root=ctx.root,
                         insecure=a.insecure)
    if ctx.json:
        ctx.emit_json(result)
    elif "group" in result:
        for member, each in result["members"].items():
            promoted = each["promoted"]
            ctx.out.print(f"volume {member}: " + ("already the primary here" if not each["changed"] else
                          f"promoted at sequence {promoted['applied_seq']}, era {promoted['era']}"))
        kind = "TAKEOVER" if result["takeover"] else "planned"
        ctx.out.print(f"group {a.name} promoted ({kind}): protect it from here with drtool protect {a.name} --peer URL"
                      if result["changed"] else f"group {a.name} is already the primary here")
    elif not result["changed"]:
        ctx.out.print(f"volume {a.name} is already the primary here")
    else:
        promoted = result["promoted"]
        kind = "TAKEOVER" if promoted["takeover"] else "planned"
        ctx.out.print(f"volume {a.name} promoted ({kind}) at sequence {promoted['applied_seq']}, era "
                      f"{promoted['era']}; device {result['device']}")
    return ExitCode.OK


def cmd_write(ctx: Context) -> int:
    a = ctx.args
    if a.input == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(a.input, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read --input {a.input}: {exc.strerror}") from None
    result = api.write(a.name, parse_size(a.offset, "offset"), data, sync=a.sync, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.out.print(f"wrote {result['length']} bytes at {result['offset']} (last sequence {result['last_seq']})")
    return ExitCode.OK


def cmd_replicate(ctx: Context) -> int:
    a = ctx.args
    result = api.replicate(a.name, wait=a.wait, regions=a.regions, timeout=a.timeout, root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    elif "members" in result:
        for member, each in result["members"].items():
            lag = each["lag"]
            ctx.out.print(f"  {member}: shipped {each['records_shipped']} records ({each['bytes_shipped']} bytes); "
                          f"lag: {lag['records']} records, {lag['regions']} regions")
        ctx.out.print(f"group {a.name}: {result['transactions']} transactions"
                      + ("" if result["consistent"] else f"; not write-order consistent: {result['reason']}"))
    else:
        lag = result["lag"]
        ctx.out.print(f"shipped {result['records_shipped']} records ({result['bytes_shipped']} bytes); "
                      f"lag: {lag['records']} records, {lag['regions']} regions")
    return ExitCode.OK


def cmd_recover(ctx: Context) -> int:
    a = ctx.args
    result = api.recover(a.name, local_era=a.local_era, source=a.source, accept_rollback=a.accept_rollback,
                         root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        verb = "entered degraded mode" if result["changed"] else "was already in " + result["mode"] + " mode"
        ctx.out.print(f"volume {a.name} {verb}: writes go to the overlay, {result['requested_count']} regions "
                      f"are served from the replica (source {result['recovery']['source']})")
        rolled_back = (result["recovery"] or {}).get("rolled_back") or []
        if rolled_back and result["changed"]:
            ctx.out.print(f"{sum(n for _, n in rolled_back)} regions went back to the snapshot's time: "
                          f"{format_runs(rolled_back, limit=20)}")
        if result["lost_regions"]:
            ctx.err.print(f"[red]lost regions (reads fail with EIO): {result['lost_regions']}[/red]")
    return ExitCode.OK


def cmd_failback(ctx: Context) -> int:
    a = ctx.args
    result = api.failback(a.name, device=a.device, rate=a.rate, root=ctx.root, progress=ctx.progress())
    if ctx.json:
        ctx.emit_json(result)
    elif not result["changed"]:
        ctx.out.print(f"volume {a.name} is in normal mode; nothing to fail back")
    else:
        ctx.out.print(f"volume {a.name}: {result['regions_copied']} regions copied onto {result['device']}; "
                      f"mode {result['mode']}")
    return ExitCode.OK


def cmd_read(ctx: Context) -> int:
    a = ctx.args
    data = api.read(a.name, parse_size(a.offset, "offset"), parse_size(a.length, "length"), root=ctx.root)
    if a.output and a.output != "-":
        with open(a.output, "wb") as handle:
            handle.write(data)
    else:
        ctx.stdout.flush()
        target = getattr(ctx.stdout, "buffer", None)
        if target is None:
            ctx.stdout.write(data.decode("latin-1"))
        else:
            target.write(data)
            target.flush()
    return ExitCode.OK


def cmd_verify(ctx: Context) -> int:
    a = ctx.args
    if a.replica_scrub:
        return _replica_scrub(ctx)
    result = api.verify_volume(a.name, regions=a.regions, repair=a.repair, rate=a.rate, restart=a.restart,
                               timeout=a.timeout, root=ctx.root, progress=ctx.progress())
    if ctx.json:
        ctx.emit_json(result)
    elif "group" in result:
        for each in result["members"].values():
            report.render_verify(ctx.out, each)
        ctx.out.print(f"group {a.name}: replica {result['result'].upper()}"
                      + (f" (differ: {', '.join(result['differ'])})" if result["differ"] else "")
                      + (f" (pending: {', '.join(result['pending'])})" if result["pending"] else ""))
    else:
        report.render_verify(ctx.out, result)
    return ExitCode.BAD_REGIONS if result["result"] == "differ" else ExitCode.OK


def _replica_scrub(ctx: Context) -> int:
    """verify --replica-scrub: the replica server scrubs its whole copy (in the background)."""
    a = ctx.args
    if a.regions is not None or a.repair:
        raise UsageError("--replica-scrub scrubs the whole replica on the server: no --regions or --repair")
    result = api.replica_scrub(a.name, rate=a.rate, restart=a.restart, wait=a.wait, timeout=a.timeout,
                               root=ctx.root)
    if ctx.json:
        ctx.emit_json(result)
    else:
        last = result.get("last") or {}
        ctx.out.print(f"replica server {result['replica_url']}: scrub of {a.name} {last.get('state')}, "
                      f"{last.get('done_regions', 0)} of {last.get('total_regions', 0)} regions, "
                      f"{format_bytes(last.get('bytes_read', 0))} read; {result['bad_count']} bad regions "
                      f"(mirror {result['bad_regions']['mirror']}, overlay {result['bad_regions']['overlay']})")
    return ExitCode.BAD_REGIONS if result["bad_count"] else ExitCode.OK


def _setup_logging(debug: bool) -> None:
    import logging

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _service(a: argparse.Namespace) -> dict[str, Any]:
    return {"detach": a.daemon, "pid_file": a.pid_file, "log_file": a.log_file}


def _metrics(a: argparse.Namespace) -> dict[str, Any]:
    return {"listen": a.metrics_listen, "tls_cert": a.metrics_tls_cert, "tls_key": a.metrics_tls_key,
            "tls_ca": a.metrics_tls_ca, "insecure": a.metrics_insecure}


def _print_plain(ctx: Context) -> Any:
    def out(text: str) -> None:
        ctx.stdout.write(text)  # plain text: scripts parse it, rich would wrap it
        ctx.stdout.flush()
    return out


def cmd_serve(ctx: Context) -> int:
    a = ctx.args

    def render(listening: dict) -> str:
        line = f"drtool replica server listening on {listening['address']}"
        if listening.get("metrics"):
            line += f"\n  metrics: {listening['metrics']}"
        return line + "\n"

    limits: dict[str, Any] = {}
    if a.max_body:
        limits["max_body"] = parse_size(a.max_body, "--max-body")
    if a.request_timeout:
        limits["request_timeout"] = a.request_timeout
    if a.max_connections:
        limits["max_connections"] = a.max_connections
    if a.header_timeout:
        limits["header_timeout"] = a.header_timeout
    journal = None if a.journal_limit is None else parse_size(a.journal_limit, "--journal-limit")
    return api.run_replica_server(a.root, a.listen, a.token_file, {"cert": a.tls_cert, "key": a.tls_key},
                                  limits, journal, a.insecure, _metrics(a), _service(a), render,
                                  _print_plain(ctx), lambda: _setup_logging(a.debug))


def cmd_agent(ctx: Context) -> int:
    a = ctx.args

    def render(addresses: dict) -> str:
        lines = [f"drtool agent (pid {addresses['pid']}) serving"]
        for name, uris in addresses["uris"].items():
            lines.append(f"  {name}: " + "  ".join(uris))
        if addresses.get("metrics"):
            lines.append(f"  metrics: {addresses['metrics']}")
        return "\n".join(lines) + "\n"

    tls = {"cert": a.tls_cert, "key": a.tls_key, "ca": a.tls_ca}
    return api.run_agent(a.names, ctx.root, a.nbd_socket, a.listen, tls, _metrics(a), _service(a), render,
                         _print_plain(ctx), lambda: _setup_logging(a.debug))


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--state-root", metavar="DIR", default=argparse.SUPPRESS,
                        help="state directory root (default $DRTOOL_STATE_ROOT or /var/lib/drtool)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print machine-readable JSON")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks")
    parser = _Parser(prog="drtool", parents=[common],
                     description="Disaster recovery for block volumes.")
    parser.add_argument("--version", action="version", version=f"drtool {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, handler: Callable[[Context], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    p = command("init", cmd_init, "register a volume and digest every region")
    p.add_argument("name")
    p.add_argument("--device", required=True, help="regular file or block device")
    p.add_argument("--region-size", default="64K", help="power of two, 4K-64M (default 64K)")
    p.add_argument("--force", action="store_true", help="re-register a volume that exists")

    p = command("scrub", cmd_scrub, "read and verify every region; update the bad map")
    p.add_argument("name")

    p = command("scan", cmd_scan, "accept regions changed outside drtool as the new truth")
    p.add_argument("name")

    p = command("upgrade", cmd_upgrade, "convert a volume's state directory to the current format "
                "(crash-safe; run it with the agent stopped)")
    p.add_argument("name")

    p = command("checkpoint", cmd_checkpoint, "start a new era and print its number")
    p.add_argument("name")

    p = command("configure", cmd_configure, "show or change a volume's settings (live under an agent)")
    p.add_argument("name")
    p.add_argument("--copy-on-read", metavar="on|off", help="keep regions fetched from the replica in the overlay")
    p.add_argument("--auto-degrade", metavar="on|off",
                   help="a bad region seen while serving enters degraded mode by itself")
    p.add_argument("--log-limit", metavar="SIZE", help="pending log bytes before bitmap mode (e.g. 1G)")
    p.add_argument("--fetch-timeout", metavar="SECONDS", type=float,
                   help="how long one replica request may wait while a client's read needs it")

    p = command("protect", cmd_protect, "pair a volume with its replica and run the initial sync")
    p.add_argument("name")
    p.add_argument("--peer", required=True, help="replica server URL, e.g. https://dr-site:8470")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--ca", help="CA certificate to verify the peer's TLS certificate")
    p.add_argument("--insecure", action="store_true", help="allow a plain http:// URL beyond loopback: the token "
                   "and the volume's bytes cross the network in cleartext")

    p.add_argument("--plan", action="store_true", help="show what would be copied; copy nothing")

    p = command("group", cmd_group, "consistency groups: volumes that replicate and fail over together, "
                "write-order consistent across each other")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for action, help_text in (("create", "create a group of registered volumes"),
                              ("add", "add volumes to a group"),
                              ("remove", "remove volumes from a group (each replicates alone again)"),
                              ("delete", "delete a group (its volumes stay)")):
        q = actions.add_parser(action, parents=[common], help=help_text, description=help_text)
        q.add_argument("name", help="the group")
        if action != "delete":
            q.add_argument("volumes", nargs="+", metavar="VOLUME")
    q = actions.add_parser("status", parents=[common], help="a group's members, lag (its recovery point) "
                           "and write-order consistency; every group without NAME")
    q.set_defaults(handler=cmd_group_status)
    q.add_argument("name", nargs="?")

    p = command("snapshot", cmd_snapshot, "create, list or delete snapshots of a volume's replica on the "
                "replica server")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    for action, help_text in (("create", "take a copy-on-write snapshot of the replica now"),
                              ("list", "list the replica's snapshots"),
                              ("delete", "delete a snapshot")):
        q = actions.add_parser(action, parents=[common], help=help_text, description=help_text)
        q.add_argument("name", help="the volume")
        if action != "list":
            q.add_argument("snapshot", help="the snapshot's name")
        q.add_argument("--replica-url", help="the replica server (default: the volume's peer, when it is "
                       "registered on this host)")
        q.add_argument("--token-file", help="file holding the bearer token")
        q.add_argument("--ca", help="CA certificate to verify the server's TLS certificate")
        q.add_argument("--insecure", action="store_true", help="allow a plain http:// URL beyond loopback")

    p = command("demote", cmd_demote, "hand the primary role over: stop writes, drain, release")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to drain replication")
    p.add_argument("--force", action="store_true", help="the secondary already took over: count the loss")

    p = command("adopt", cmd_adopt, "serve a demoted volume from this host's replica server")
    p.add_argument("name")
    p.add_argument("--replica-url", required=True, help="this host's replica server")
    p.add_argument("--token-file")
    p.add_argument("--ca")
    p.add_argument("--insecure", action="store_true", help="allow a plain http:// URL beyond loopback: the token "
                   "and the volume's bytes cross the network in cleartext")
    p.add_argument("--force", action="store_true", help="a running agent serving it disconnects its NBD "
                   "clients (without it, connected clients make adopt fail with exit 6)")

    p = command("promote", cmd_promote, "turn this host's replica into the primary volume")
    p.add_argument("name")
    p.add_argument("--replica-url", required=True, help="this host's replica server")
    p.add_argument("--token-file")
    p.add_argument("--ca")
    p.add_argument("--insecure", action="store_true", help="allow a plain http:// URL beyond loopback: the token "
                   "and the volume's bytes cross the network in cleartext")
    p.add_argument("--force", action="store_true", help="takeover: the old primary is unreachable")

    p = command("write", cmd_write, "write bytes through drtool (logged and replicated)")
    p.add_argument("name")
    p.add_argument("--offset", required=True, help="byte offset (units allowed: 1M)")
    p.add_argument("--input", default="-", help="file to write (default: standard input)")
    p.add_argument("--sync", action="store_true", help="durable before returning (like FUA)")

    p = command("replicate", cmd_replicate, "ship pending writes to the secondary")
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="keep shipping until the lag is zero")
    p.add_argument("--regions", help="force exactly these regions' records (e.g. 3,10-12)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --wait may take")

    p = command("recover", cmd_recover, "enter degraded mode: overlay writes, merged verified reads")
    p.add_argument("name")
    p.add_argument("--local-era", type=int, help="the local copy is older: it holds writes before this era")
    p.add_argument("--source", default="mirror", help="mirror (default), journal or snapshot:NAME")
    p.add_argument("--accept-rollback", action="store_true",
                   help="with snapshot:NAME: go ahead although regions go back to the snapshot's time "
                        "(without it they are listed and nothing changes)")

    p = command("failback", cmd_failback, "copy bad and overlay regions back into the device")
    p.add_argument("name")
    p.add_argument("--device", help="a replacement device of the same size")
    p.add_argument("--rate", help="throttle, bytes per second (e.g. 200M)")

    p = command("read", cmd_read, "a merged, verified read (for scripts)")
    p.add_argument("name")
    p.add_argument("--offset", required=True)
    p.add_argument("--length", required=True)
    p.add_argument("-o", "--output", help="file to write (default standard output)")

    p = command("verify", cmd_verify, "prove the replica: it re-reads and re-hashes its regions, compared with "
                "the manifest; exit 3 when regions differ")
    p.add_argument("name")
    p.add_argument("--regions", help="only these regions (e.g. 3,10-12,40+4); default every region")
    p.add_argument("--repair", action="store_true", help="ship the regions that differ again, then verify them")
    p.add_argument("--rate", help="throttle: bytes per second the replica reads (e.g. 200M)")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming an interrupted verify")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds --repair may wait for replication "
                   "(--replica-scrub --wait: for the scrub)")
    p.add_argument("--replica-scrub", action="store_true", help="have the replica server scrub its whole copy "
                   "in the background (mirror and overlay replica) and show what its scrubs found")
    p.add_argument("--wait", action="store_true", help="with --replica-scrub: until the scrub finished")

    def daemon_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--daemon", action="store_true", help="detach (for hosts without systemd)")
        p.add_argument("--pid-file", help="with --daemon: where to write the pid")
        p.add_argument("--log-file", help="where to write the log (default standard error; required with "
                       "--daemon); reopened on SIGHUP, for logrotate")

    def metrics_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus metrics on HOST:PORT "
                       "(default: off; docs/metrics.md); beyond loopback it needs --metrics-tls-cert and "
                       "--metrics-tls-key, or --metrics-insecure")
        p.add_argument("--metrics-tls-cert", help="with --metrics-listen: PEM certificate; serve HTTPS")
        p.add_argument("--metrics-tls-key", help="with --metrics-listen: PEM private key (mode 0600)")
        p.add_argument("--metrics-tls-ca", help="with --metrics-tls-cert: PEM CA; scrapers must present a "
                       "certificate it signed")
        p.add_argument("--metrics-insecure", action="store_true", help="serve metrics over plain HTTP beyond "
                       "loopback anyway: anyone who reaches it learns the volumes' names and state")

    p = command("agent", cmd_agent, "serve volumes over NBD, replicate, answer the CLI")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--nbd-socket", help="Unix socket for NBD clients, mode 0600 (default nbd.sock in the "
                   "state root; 'none': TCP only)")
    p.add_argument("--listen", help="also serve NBD on TCP HOST:PORT (default: no TCP); beyond loopback it "
                   "requires --tls-cert and --tls-key")
    p.add_argument("--tls-cert", help="with --listen: PEM certificate; clients must use TLS (nbds://)")
    p.add_argument("--tls-key", help="with --listen: PEM private key (mode 0600)")
    p.add_argument("--tls-ca", help="with --tls-cert: PEM CA; clients must present a certificate it signed")
    daemon_options(p)
    metrics_options(p)

    p = command("attach", cmd_attach, "have the running agent serve one more registered volume (its other "
                "volumes' clients are not disturbed)")
    p.add_argument("name")

    p = command("detach", cmd_detach, "have the running agent stop serving a volume and release it (its other "
                "volumes' clients are not disturbed); exit 6 while NBD clients are connected to it")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="disconnect the volume's NBD clients (their requests in "
                   "flight are answered first)")

    p = command("serve", cmd_serve, "run the secondary's replica server")
    p.add_argument("--root", required=True, help="directory holding the replicas")
    p.add_argument("--listen", default="127.0.0.1:8470", help="HOST:PORT (port 0 picks one and prints it)")
    p.add_argument("--token-file", help="file (mode 0600) holding the bearer token clients must send")
    p.add_argument("--tls-cert", help="PEM certificate; with --tls-key, serve HTTPS (required beyond loopback)")
    p.add_argument("--tls-key", help="PEM private key (mode 0600)")
    p.add_argument("--insecure", action="store_true", help="serve plain HTTP beyond loopback anyway: the token "
                   "and the volumes' bytes cross the network in cleartext")
    p.add_argument("--journal-limit", help="bytes of applied records kept per replica for change queries "
                   "(default 256M; 0: no journal)")
    p.add_argument("--max-body", help="largest record batch accepted (default 256M)")
    p.add_argument("--request-timeout", type=float, help="seconds a request may take to arrive (default 60)")
    p.add_argument("--max-connections", type=int, help="concurrent connections (default 64)")
    p.add_argument("--header-timeout", type=float, help="seconds a client without the token may take to send "
                   "a request's headers (default 5)")
    daemon_options(p)
    metrics_options(p)

    p = command("report", cmd_report, "render status JSON gathered from many hosts")
    p.add_argument("file", help="JSON: {host: [status, ...]} or [status, ...] ('-' for stdin)")
    p.add_argument("--detail", action="store_true", help="a full panel for every volume")

    p = command("status", cmd_status, "show the status of one volume or group, or of all")
    p.add_argument("name", nargs="?", help="a volume or a consistency group")
    p.add_argument("--replica-root", help="on a secondary: show the replicas kept under this directory")
    p.add_argument("-x", action="store_true", help="only the volumes that need attention (not ONLINE, not "
                   "protected, not in normal mode)")
    return parser


def main(argv: Sequence[str] | None = None, stdout: Any = None, stderr: Any = None) -> int:
    """Run one command; return its exit code.  Never raises for a DrtoolError."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    wants_json = "--json" in argv
    import logging

    if not logging.getLogger().handlers:
        # Engine warnings (a region failed verification, degraded mode entered by itself)
        # reach the operator as one line each; the long-running commands log fully.
        logging.basicConfig(level=logging.WARNING, format="drtool: warning: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        for flag, default in (("state_root", None), ("json", False), ("debug", False)):
            if not hasattr(args, flag):
                setattr(args, flag, default)
        return int(args.handler(Context(args, stdout, stderr)))
    except DrtoolError as exc:
        return _fail(exc, exc.exit_code, debug, wants_json, stdout, stderr)
    except KeyboardInterrupt:
        stderr.write("drtool: interrupted\n")
        return 130
    except BrokenPipeError:
        return ExitCode.OK
    except PermissionError as exc:  # not a bug: this user may not read or write there
        return _fail(StateError(permission_message(exc.filename)), ExitCode.STATE, debug, wants_json, stdout, stderr)
    except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
        return _fail(exc, ExitCode.ERROR, debug, wants_json, stdout, stderr,
                     prefix="internal error: ")


def permission_message(path: Any) -> str:
    where = f" on {path}" if path else ""
    return (f"permission denied{where}: drtool needs to read and write its state root (and the devices); "
            "run it as root or as the user that owns them")


def _check_readable_root(root: str | None) -> None:
    """A state root this user cannot list must not look empty ("not registered")."""
    from drtool.storage.paths import state_root

    path = state_root(root)
    if not os.path.isdir(path):
        return
    if not os.access(path, os.R_OK | os.X_OK):
        raise StateError(permission_message(path))
    for entry in sorted(os.listdir(path)):  # a volume's own directory (mode 0700) hides its record
        inside = os.path.join(path, entry)
        if os.path.isdir(inside) and not os.access(inside, os.R_OK | os.X_OK):
            raise StateError(permission_message(inside))


def _fail(exc: BaseException, code: int, debug: bool, wants_json: bool, stdout: Any, stderr: Any,
          prefix: str = "") -> int:
    if debug:
        traceback.print_exception(exc, file=stderr)
    message = f"{prefix}{exc}" if str(exc) else f"{prefix}{type(exc).__name__}"
    stderr.write(f"drtool: {message}\n")
    if wants_json:
        error = {"type": type(exc).__name__, "message": message, "exit_code": int(code)}
        stdout.write(json.dumps({"error": error}) + "\n")
    return int(code)


def main_entry() -> NoReturn:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
