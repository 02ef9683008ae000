"""Prometheus metrics of ``drtool agent`` and ``drtool serve`` (``--metrics-listen``; docs/metrics.md).

Two kinds of numbers:

* **States** (health, mode, protection, bad/lost/overlay regions, lag, a replica's applied
  sequence and journal) are not kept here: a scrape asks the code that owns them, the same
  status ``status --json`` shows (:func:`drtool.ops.status` for a volume of the agent,
  ``ReplicaVolume.describe`` for a replica), so the two never disagree.
* **Counters** of what happened (NBD requests, fetches, HTTP requests) are counted where it
  happens, at a cost the data path does not notice: an NBD request adds one to a list only its
  own thread writes (:class:`Tally`, no lock); a fetch, which waits on the network anyway, takes
  a lock once.

prometheus_client renders the exposition format (text and OpenMetrics) and its families;
this module feeds it at scrape time from collectors (objects with ``collect()``, as
prometheus_client.registry.Collector asks).
Nothing here imports the engine, the agent or the replica store: they hand in what to read,
so this room sits below them all (drtool.fetch and drtool.export count through it).
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from drtool.errors import PeerError, RegionsLost, UsageError, VerificationFailed
from drtool.tls import is_loopback

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# prometheus_client is imported where a scrape or the endpoint needs it, not here: the data path
# (drtool.fetch, drtool.export) imports this module for its counters alone.

log = logging.getLogger("drtool.metrics")

DEFAULT_PORT = 9470  # neither the replica server's 8470 nor NBD's 10809
TLS_FLAGS = "--metrics-tls-cert FILE and --metrics-tls-key FILE"

HEALTH_STATES = ("ONLINE", "DEGRADED", "FAULTED")
MODES = ("normal", "degraded", "resync")
PROTECTION_STATES = ("PROTECTED", "LAGGING", "UNPROTECTED")
REPLICA_STATES = ("replica", "released", "promoted")
#: NBD commands that reach a volume, in the order of a Tally's cells
NBD_COMMANDS = ("read", "write", "flush", "trim", "write_zeroes")
#: upper bounds of the fetch latency buckets, seconds (a fetch is a network round trip or more)
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)


# -- where to listen -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsListen:
    """``--metrics-listen`` checked: where, and TLS (None: plain HTTP)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    insecure: bool = False  # plain HTTP beyond loopback, asked for with --metrics-insecure

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT (port 0 picks a free one)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("["):
        if not host.endswith("]"):
            host = ""
        host = host[1:-1]
    elif ":" in host:
        host = ""  # a bare IPv6 address needs brackets: [::1]:9470
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics-listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}, "
                         f"[::1]:{DEFAULT_PORT})")
    return host, int(port)


def metrics_listen(listen: str | None, tls_cert: str | None = None, tls_key: str | None = None,
                   tls_ca: str | None = None, insecure: bool = False) -> MetricsListen | None:
    """Check ``--metrics-listen`` and its flags together (before a daemon detaches).

    Off by default.  Loopback: plain HTTP is fine (the numbers say what state the volumes are
    in, never a byte of them nor a secret; every local user can read them, as with
    node_exporter).  Beyond loopback (a wildcard included) the endpoint tells anyone who can
    reach it which volumes exist and when the site is unprotected, so it needs TLS
    (``--metrics-tls-cert``/``--metrics-tls-key``, ``--metrics-tls-ca`` to require client
    certificates: Prometheus' ``tls_config``) or an explicit ``--metrics-insecure``.
    """
    given = [flag for flag, value in (("--metrics-tls-cert", tls_cert), ("--metrics-tls-key", tls_key),
                                      ("--metrics-tls-ca", tls_ca), ("--metrics-insecure", insecure)) if value]
    if not listen:
        if given:
            raise UsageError(f"{', '.join(given)} configure the metrics endpoint: give --metrics-listen "
                             "HOST:PORT too")
        return None
    host, port = parse_address(listen)
    if tls_cert or tls_key or tls_ca:
        if not (tls_cert and tls_key):
            raise UsageError(f"metrics over TLS need {TLS_FLAGS} (and --metrics-tls-ca FILE to require "
                             "client certificates)")
        if insecure:
            raise UsageError("--metrics-insecure serves plain HTTP: it contradicts --metrics-tls-cert")
        from drtool.tls import server_context

        return MetricsListen(host, port, server_context(tls_cert, tls_key, tls_ca))
    if not is_loopback(host) and not insecure:
        raise UsageError(
            f"--metrics-listen {listen}: metrics on an address other hosts can reach need TLS ({TLS_FLAGS}) "
            "or --metrics-insecure (they name every volume and say when the site is unprotected); "
            "or listen on loopback (127.0.0.1)")
    return MetricsListen(host, port, None, insecure=not is_loopback(host))


# -- counting on the hot paths ---------------------------------------------------------------


class Tally:
    """A few counters that many threads add to without a lock.

    Each thread adds into its own list (found through a ``threading.local``), which no other
    thread writes; a scrape sums the lists (copying a list is atomic under the GIL).  The lists
    of threads that ended are folded into ``retired`` at a scrape, so they do not pile up.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._local = threading.local()
        self._lock = threading.Lock()  # the list of cells: taken once per thread, and by a scrape
        self._cells: list[tuple[weakref.ref[threading.Thread], list[int]]] = []
        self._retired = [0] * size

    def cell(self) -> list[int]:
        """This thread's counters: add to them in place."""
        try:
            return self._local.cell
        except AttributeError:
            cell = self._local.cell = [0] * self.size
            with self._lock:
                self._cells.append((weakref.ref(threading.current_thread()), cell))
            return cell

    def totals(self) -> list[int]:
        with self._lock:
            live = []
            for owner, cell in self._cells:
                thread = owner()
                if thread is None or not thread.is_alive():  # it adds nothing any more
                    self._retired = [a + b for a, b in zip(self._retired, list(cell))]
                else:
                    live.append((owner, cell))
            self._cells = live
            total = list(self._retired)
        for _, cell in live:
            total = [a + b for a, b in zip(total, list(cell))]
        return total


class NbdCounts:
    """NBD requests that reached a volume, and those answered with an error, by command."""

    def __init__(self) -> None:
        self.tally = Tally(2 * len(NBD_COMMANDS))

    def by_command(self) -> dict[str, tuple[int, int]]:
        totals = self.tally.totals()
        n = len(NBD_COMMANDS)
        return {command: (totals[i], totals[n + i]) for i, command in enumerate(NBD_COMMANDS)}


F = TypeVar("F", bound=Callable[..., Any])


def counted(command: str) -> Callable[[F], F]:
    """Count each call of a volume's NBD method (drtool.export.EngineExport: ``self.nbd_counts``)
    and each that raised (the client gets an error reply)."""
    index = NBD_COMMANDS.index(command)
    errors = len(NBD_COMMANDS) + index

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def run(self: Any, *args: Any) -> Any:
            cell = self.nbd_counts.tally.cell()
            cell[index] += 1
            try:
                return method(self, *args)
            except BaseException:
                cell[errors] += 1
                raise
        return run  # type: ignore[return-value]
    return wrap


FETCH_ERRORS = ("verification", "lost", "peer", "other")


class FetchStats:
    """Fetches of one volume's regions from the replica: a lock per fetch (a network wait anyway)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.regions = 0
        self.bytes = 0
        self.verification_failures = 0  # regions whose bytes did not match, each attempt
        self.errors = dict.fromkeys(FETCH_ERRORS, 0)
        self.buckets = [0] * len(FETCH_BUCKETS)
        self.seconds = 0.0

    def done(self, seconds: float, got: dict[int, tuple[bytes, bytes]] | None, error: BaseException | None) -> None:
        with self.lock:
            self.count += 1
            self.seconds += seconds
            for i, bound in enumerate(FETCH_BUCKETS):
                if seconds <= bound:
                    self.buckets[i] += 1
                    break
            if got is not None:
                self.regions += len(got)
                self.bytes += sum(len(data) for data, _ in got.values())
            if error is not None:
                self.errors[_fetch_error(error)] += 1

    def failed_verification(self, regions: int) -> None:
        with self.lock:
            self.verification_failures += regions

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            cumulative, running = [], 0
            for count in self.buckets:
                running += count
                cumulative.append(running)
            return {"count": self.count, "regions": self.regions, "bytes": self.bytes,
                    "verification_failures": self.verification_failures, "errors": dict(self.errors),
                    "buckets": cumulative, "seconds": self.seconds}


def _fetch_error(error: BaseException) -> str:
    if isinstance(error, VerificationFailed):
        return "verification"
    if isinstance(error, RegionsLost):
        return "lost"
    if isinstance(error, PeerError):
        return "peer"
    return "other"


class VolumeStats:
    """What is counted for one open volume (one engine)."""

    def __init__(self) -> None:
        self.nbd = NbdCounts()
        self.fetch = FetchStats()


_STATS: weakref.WeakKeyDictionary[Any, VolumeStats] = weakref.WeakKeyDictionary()
_STATS_LOCK = threading.Lock()


def of(engine: Any) -> VolumeStats:
    """The counters of an open volume (keyed by its engine: a reopened volume starts at zero,
    which Prometheus reads as a counter reset).  Look it up once, not per request."""
    with _STATS_LOCK:
        stats = _STATS.get(engine)
        if stats is None:
            stats = _STATS[engine] = VolumeStats()
        return stats


def timed_fetch(method: F) -> F:
    """Time and count ``RemoteFetcher.fetch`` (``self.engine``: the volume): from the read's
    request to verified bytes, a forced replication of lagging regions included."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = of(self.engine).fetch
        started = time.perf_counter()
        got = None
        error: BaseException | None = None
        try:
            got = method(self, *args, **kwargs)
            return got
        except BaseException as exc:
            error = exc
            raise
        finally:
            stats.done(time.perf_counter() - started, got, error)
    return run  # type: ignore[return-value]


# -- what a scrape reads ---------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: Iterable[str] = ("volume",)) -> GaugeMetricFamily:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ("volume",)) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, labels=list(labels))


def _flag(value: Any) -> float:
    return 1.0 if value else 0.0


@dataclass
class VolumeFacts:
    """What the agent hands a scrape for one volume."""

    name: str
    status: Callable[[], dict[str, Any]]  # the status object, as ``status --json`` shows it
    replicator: Any | None  # drtool.replication.Replicator: shipped counters
    stats: VolumeStats


class AgentCollector:
    """The agent's volumes: states from their status objects, counters from :class:`VolumeStats`."""

    def __init__(self, volumes: Callable[[], list[VolumeFacts]], started: float,
                 groups: Callable[[], list[dict[str, Any]]] | None = None,
                 group_status: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.volumes = volumes
        self.started = started
        #: the consistency groups defined (storage.groups, ``to_json``): their states are
        #: composed from the same member status objects as the volumes' by ``group_status``
        #: (drtool.status.group_status, given by the agent: this module imports no status code)
        self.groups = groups
        self.group_status = group_status

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        g = {
            "up": _gauge("drtool_volume_up", "1 when the volume's status could be read at this scrape"),
            "info": _gauge("drtool_volume_info", "the volume's role, device and replica peer (always 1)",
                           ("volume", "role", "device", "peer")),
            "health": _gauge("drtool_volume_health", "1 for the volume's health (status: health)",
                             ("volume", "state")),
            "mode": _gauge("drtool_volume_mode", "1 for the volume's mode (status: mode)", ("volume", "mode")),
            "protection": _gauge("drtool_volume_protection", "1 for the volume's protection (status: "
                                 "protection; absent on a secondary)", ("volume", "state")),
            "attention": _gauge("drtool_volume_attention", "1 when drtool status -x lists the volume"),
            "read_only": _gauge("drtool_volume_read_only", "1 when the volume is served read-only"),
            "size": _gauge("drtool_volume_size_bytes", "size of the volume"),
            "regions": _gauge("drtool_volume_regions", "regions of the volume"),
            "bad": _gauge("drtool_volume_bad_regions", "regions the device cannot serve (bad map)"),
            "bad_bytes": _gauge("drtool_volume_bad_bytes", "bytes of the bad regions"),
            "lost": _gauge("drtool_volume_lost_regions", "bad regions never replicated: reads of them fail"),
            "stale": _gauge("drtool_volume_stale_regions", "regions stale on an older local copy (--local-era)"),
            "overlay": _gauge("drtool_volume_overlay_regions", "regions held in the overlay"),
            "overlay_bytes": _gauge("drtool_volume_overlay_bytes", "bytes held in the overlay"),
            "failback_done": _gauge("drtool_failback_done_regions", "regions failback copied back so far"),
            "failback_total": _gauge("drtool_failback_total_regions", "regions failback has to copy back"),
            "lag_records": _gauge("drtool_replication_lag_records", "log records the replica has not acknowledged"),
            "lag_bytes": _gauge("drtool_replication_lag_bytes", "bytes waiting to be replicated "
                                "(log records, plus whole regions in bitmap mode)"),
            "lag_regions": _gauge("drtool_replication_lag_regions", "regions written but not acknowledged"),
            "lag_oldest": _gauge("drtool_replication_lag_oldest_seconds", "age of the oldest write not "
                                 "acknowledged (0 when in sync): the recovery point if the site went now"),
            "bitmap": _gauge("drtool_replication_bitmap_mode", "1 when the log overflowed (bitmap mode)"),
            "bitmap_regions": _gauge("drtool_replication_bitmap_regions", "regions to ship whole from the volume"),
            "damaged": _gauge("drtool_replication_log_damaged", "1 when the replication log is damaged"),
            "synced": _gauge("drtool_replication_initial_sync_done", "1 once the initial sync to the replica finished"),
            "acked": _gauge("drtool_replication_acked_seq", "log sequence the replica acknowledged through"),
            "reachable": _gauge("drtool_replication_peer_reachable", "1 when the replica server answered the last "
                                "attempt, 0 when it did not (absent until known)", ("volume", "peer")),
            "last_ack": _gauge("drtool_replication_last_ack_timestamp_seconds", "when the replica server last "
                               "acknowledged a batch (since this agent started; absent before)"),
        }
        c = {
            "shipped_bytes": _counter("drtool_replication_shipped_bytes", "bytes of log records shipped and "
                                      "acknowledged"),
            "shipped_records": _counter("drtool_replication_shipped_records", "log records shipped and acknowledged"),
            "fetches": _counter("drtool_fetch_requests", "fetches of regions from the replica (one per read that "
                                "needed the replica)"),
            "fetch_regions": _counter("drtool_fetch_regions", "regions fetched and verified"),
            "fetch_bytes": _counter("drtool_fetch_bytes", "bytes fetched and verified"),
            "fetch_errors": _counter("drtool_fetch_errors", "fetches that failed, by reason", ("volume", "reason")),
            "verify": _counter("drtool_fetch_verification_failures", "fetched regions that failed verification "
                               "(each attempt; a region failing twice is refused with EIO)"),
            "nbd": _counter("drtool_nbd_requests", "NBD requests that reached the volume", ("volume", "command")),
            "nbd_errors": _counter("drtool_nbd_errors", "NBD requests answered with an error",
                                   ("volume", "command")),
        }
        latency = HistogramMetricFamily("drtool_fetch_duration_seconds", "time a fetch took, forced replication "
                                        "of lagging regions included", labels=["volume"])
        statuses: dict[str, dict[str, Any]] = {}
        for facts in self.volumes():
            name = facts.name
            try:
                statuses[name] = facts.status()
                self._states(g, name, statuses[name])
                g["up"].add_metric([name], 1)
            except Exception as exc:  # one volume's trouble must not hide the others
                log.warning("metrics: status of volume %s: %s", name, exc)
                g["up"].add_metric([name], 0)
            self._counters(c, latency, facts)
        yield from self._groups(statuses)
        yield GaugeMetricFamily("drtool_agent_start_time_seconds", "when this agent started", value=self.started)
        yield from g.values()
        yield from c.values()
        yield latency

    @staticmethod
    def _states(g: dict[str, GaugeMetricFamily], name: str, s: dict[str, Any]) -> None:
        peer = s.get("peer") or {}
        g["info"].add_metric([name, s.get("role") or "", s.get("device") or "", peer.get("url") or ""], 1)
        for state in HEALTH_STATES:
            g["health"].add_metric([name, state], _flag(s["health"] == state))
        for mode in MODES:
            g["mode"].add_metric([name, mode], _flag(s["mode"] == mode))
        if s.get("protection"):
            for state in PROTECTION_STATES:
                g["protection"].add_metric([name, state], _flag(s["protection"] == state))
        g["attention"].add_metric([name], _flag(s.get("attention") or s.get("health") != "ONLINE"))
        g["read_only"].add_metric([name], _flag(s.get("read_only")))
        g["size"].add_metric([name], s["size"])
        g["regions"].add_metric([name], s["regions_total"])
        g["bad"].add_metric([name], s["bad_count"])
        g["bad_bytes"].add_metric([name], s["bad_bytes"])
        g["lost"].add_metric([name], s["lost_count"])
        g["stale"].add_metric([name], s.get("stale_count", 0))
        g["overlay"].add_metric([name], s["overlay"]["regions"])
        g["overlay_bytes"].add_metric([name], s["overlay"]["bytes"])
        failback = s.get("failback") or {}
        g["failback_done"].add_metric([name], failback.get("done_regions", 0))
        g["failback_total"].add_metric([name], failback.get("total_regions", 0))
        if s.get("role") == "secondary":
            return  # a demoted volume ships nothing: no lag, no peer
        lag = s.get("lag") or {}
        g["lag_records"].add_metric([name], lag.get("records", 0))
        g["lag_bytes"].add_metric([name], lag.get("bytes", 0))
        g["lag_regions"].add_metric([name], lag.get("regions", 0))
        g["lag_oldest"].add_metric([name], lag.get("oldest_seconds", 0.0))
        g["bitmap"].add_metric([name], _flag(lag.get("bitmap_mode")))
        g["bitmap_regions"].add_metric([name], lag.get("bitmap_regions", 0))
        g["damaged"].add_metric([name], _flag(lag.get("log_damage")))
        if peer:
            replication = s.get("replication") or {}
            g["synced"].add_metric([name], _flag(replication.get("initial_sync") == "done"))
            g["acked"].add_metric([name], max(replication.get("acked_through") or 0,
                                              replication.get("dropped_through") or 0))
            if peer.get("reachable") is not None:
                g["reachable"].add_metric([name, peer["url"]], _flag(peer["reachable"]))
            if peer.get("last_ack"):
                g["last_ack"].add_metric([name], peer["last_ack"])

    def _groups(self, statuses: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        """The consistency groups whose members this agent serves: their recovery point and
        whether their replica is write-order consistent, from the members' status objects."""
        if self.groups is None or self.group_status is None:
            return
        g = {
            "lag": _gauge("drtool_group_lag_seconds", "age of the oldest write not acknowledged on any member "
                          "of the group (0 in sync): the group's recovery point", ("group",)),
            "records": _gauge("drtool_group_lag_records", "log records of the group's members not acknowledged",
                              ("group",)),
            "bytes": _gauge("drtool_group_lag_bytes", "bytes of the group's members waiting to be replicated",
                            ("group",)),
            "consistent": _gauge("drtool_group_consistent", "1 when the group's replica is write-order consistent "
                                 "across its members (status: consistent; absent on a secondary)", ("group",)),
            "protection": _gauge("drtool_group_protection", "1 for the group's protection (status: protection)",
                                 ("group", "state")),
        }
        try:
            groups = self.groups()
        except Exception as exc:
            log.warning("metrics: consistency groups: %s", exc)
            return
        for group in groups:
            if not all(m in statuses for m in group["members"]):
                continue  # not served (wholly) here: this agent cannot say
            # No probe of the replica server: a scrape must stay cheap (drtool status asks it).
            s = self.group_status(group, {m: statuses[m] for m in group["members"]})
            name = group["name"]
            if s["role"] != "primary":
                continue
            g["lag"].add_metric([name], s["rpo_seconds"] or 0.0)
            g["records"].add_metric([name], s["lag"]["records"])
            g["bytes"].add_metric([name], s["lag"]["bytes"])
            g["consistent"].add_metric([name], _flag(s["consistent"]))
            for state in PROTECTION_STATES:
                g["protection"].add_metric([name, state], _flag(s["protection"] == state))
        yield from g.values()

    @staticmethod
    def _counters(c: dict[str, CounterMetricFamily], latency: HistogramMetricFamily, facts: VolumeFacts) -> None:
        name = facts.name
        replicator = facts.replicator
        if replicator is not None:
            c["shipped_bytes"].add_metric([name], replicator.shipped_bytes)
            c["shipped_records"].add_metric([name], replicator.shipped_records)
        fetch = facts.stats.fetch.snapshot()
        c["fetches"].add_metric([name], fetch["count"])
        c["fetch_regions"].add_metric([name], fetch["regions"])
        c["fetch_bytes"].add_metric([name], fetch["bytes"])
        c["verify"].add_metric([name], fetch["verification_failures"])
        for reason, count in fetch["errors"].items():
            c["fetch_errors"].add_metric([name, reason], count)
        latency.add_metric([name], [(_le(bound), count) for bound, count in zip(FETCH_BUCKETS, fetch["buckets"])],
                           fetch["seconds"])
        for command, (requests, errors) in facts.stats.nbd.by_command().items():
            c["nbd"].add_metric([name, command], requests)
            c["nbd_errors"].add_metric([name, command], errors)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


# -- the replica server ---------------------------------------------------------------------


class HttpCounts:
    """The replica server's HTTP requests by method and status code (one lock per request: a
    request is a network round trip, and a scrape reads a dict)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.sent = 0

    def add(self, method: str, status: int, sent: int) -> None:
        key = (method if method in ("GET", "HEAD", "POST", "PUT", "DELETE") else "other", str(status))
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            if sent > 0:
                self.sent += sent

    def snapshot(self) -> tuple[dict[tuple[str, str], int], int]:
        with self.lock:
            return dict(self.requests), self.sent


class ReplicaCollector:
    """The replicas a server keeps, from the same description ``GET /v1/volumes/{name}`` and
    ``drtool status --replica-root`` give."""

    def __init__(self, names: Callable[[], list[str]], describe: Callable[[str], dict[str, Any]],
                 http: HttpCounts, started: float) -> None:
        self.names = names
        self.describe_replica = describe
        self.http = http
        self.started = started

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ("replica",)
        g = {
            "up": _gauge("drtool_replica_up", "1 when the replica could be described at this scrape", labels),
            "state": _gauge("drtool_replica_state", "1 for the replica's state (replica: receiving records; "
                            "released: its primary handed over; promoted: it is a primary now)",
                            ("replica", "state")),
            "size": _gauge("drtool_replica_size_bytes", "size of the replica", labels),
            "applied": _gauge("drtool_replica_applied_seq", "log sequence applied through (mirror)", labels),
            "ahead": _gauge("drtool_replica_applied_ahead", "records applied out of order above it", labels),
            "overlay_applied": _gauge("drtool_replica_overlay_applied_seq", "overlay log sequence applied through",
                                      labels),
            "overlay_regions": _gauge("drtool_replica_overlay_regions", "regions in the overlay replica", labels),
            "last_record": _gauge("drtool_replica_last_record_timestamp_seconds", "when a record was last applied "
                                  "(absent before any)", labels),
            "journal_enabled": _gauge("drtool_replica_journal_enabled", "1 when the change journal is kept", labels),
            "journal_first": _gauge("drtool_replica_journal_first_seq", "oldest sequence the journal still holds "
                                    "(absent when empty): a recovery --local-era needs the changes after its era "
                                    "from here on", labels),
            "journal_last": _gauge("drtool_replica_journal_last_seq", "newest sequence in the journal", labels),
            "journal_records": _gauge("drtool_replica_journal_records", "records in the journal", labels),
            "journal_bytes": _gauge("drtool_replica_journal_bytes", "bytes of the journal", labels),
            "snapshots": _gauge("drtool_replica_snapshots", "snapshots kept of the replica", labels),
            "scrub_bad": _gauge("drtool_replica_scrub_bad_regions", "regions the replica's own scrub found bad",
                                labels),
        }
        for name in self.names():
            try:
                self._replica(g, name, self.describe_replica(name))
                g["up"].add_metric([name], 1)
            except Exception as exc:  # a torn or half-adopted replica: say so, describe the others
                log.warning("metrics: replica %s: %s", name, exc)
                g["up"].add_metric([name], 0)
        yield GaugeMetricFamily("drtool_replica_server_start_time_seconds", "when this replica server started",
                                value=self.started)
        yield from g.values()
        requests, sent = self.http.snapshot()
        family = _counter("drtool_replica_http_requests", "HTTP requests answered, by method and status code",
                          ("method", "code"))
        for (method, code), count in sorted(requests.items()):
            family.add_metric([method, code], count)
        yield family
        yield CounterMetricFamily("drtool_replica_http_sent_bytes", "bytes of HTTP response bodies sent",
                                  value=sent)

    @staticmethod
    def _replica(g: dict[str, GaugeMetricFamily], name: str, info: dict[str, Any]) -> None:
        for state in REPLICA_STATES:
            g["state"].add_metric([name, state], _flag(info.get("state") == state))
        g["size"].add_metric([name], info["size"])
        g["applied"].add_metric([name], info["applied_seq"] or 0)
        g["ahead"].add_metric([name], len(info.get("applied_ahead") or ()))
        overlay = info.get("overlay") or {}
        g["overlay_applied"].add_metric([name], overlay.get("applied_seq") or 0)
        g["overlay_regions"].add_metric([name], overlay.get("regions") or 0)
        if info.get("last_record_at"):
            g["last_record"].add_metric([name], info["last_record_at"])
        journal = info.get("journal") or {}
        g["journal_enabled"].add_metric([name], _flag(journal.get("enabled")))
        if journal.get("first_seq") is not None:
            g["journal_first"].add_metric([name], journal["first_seq"])
        if journal.get("last_seq") is not None:
            g["journal_last"].add_metric([name], journal["last_seq"])
        g["journal_records"].add_metric([name], journal.get("records") or 0)
        g["journal_bytes"].add_metric([name], journal.get("bytes") or 0)
        g["snapshots"].add_metric([name], len(info.get("snapshots") or ()))
        g["scrub_bad"].add_metric([name], (info.get("scrub") or {}).get("bad_count") or 0)


# -- the endpoint -----------------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    timeout = 30  # a client that stops talking gives its thread back

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s would flood the log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # The handshake runs in the request's thread (finish_request), not in the accept loop.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(_Handler.timeout)
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                log.info("metrics: %s: TLS handshake failed: %s", client_address[0], exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: %s: connection error", client_address[0], exc_info=True)


class MetricsServer:
    """The HTTP(S) endpoint: ``GET /metrics`` (any path answers the same)."""

    def __init__(self, listen: MetricsListen, collector: AgentCollector | ReplicaCollector) -> None:
        from prometheus_client import make_wsgi_app
        from prometheus_client.registry import CollectorRegistry

        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        try:
            family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            server_class = type("MetricsHTTPServer", (_Server,), {"address_family": family, "tls": listen.tls})
            self.httpd = make_server(listen.host, listen.port, make_wsgi_app(self.registry), server_class,
                                     handler_class=_Handler)
        except OSError as exc:
            raise UsageError(f"--metrics-listen {listen.where}: cannot listen: {exc.strerror or exc}") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.listen.tls else "http"
        host = self.listen.host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        self.thread.start()
        if self.listen.insecure:
            log.warning("metrics on %s over plain HTTP (--metrics-insecure): anyone who can reach it learns "
                        "the volumes' names and when they are unprotected", self.listen.where)
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
