"""Scale: what drtool's commands cost on sparse volumes of 1 GiB to 15 TiB holding the same 1 GiB.

    .venv/bin/python bench/scale.py [--sizes 1G,256G,4T,15T] [--rev REV] [--json FILE]

For each size a sparse file (``truncate``) with 64 KiB regions holds the same allocated data:
16 extents of 64 MiB of random bytes spread evenly over it.  Each drtool command runs as its
own process, and its wall time and peak RSS are measured:

    init, checkpoint, protect (to a fresh `drtool serve`), the agent's start (until its NBD
    socket answers a handshake), 20 scattered 4 KiB writes through the agent's NBD export
    (each followed by FLUSH), status --json, scrub (after one region is corrupted on the
    device: exit 3), recover, failback; and the replica server's peak RSS.

Peak RSS is the kernel's own accounting of the finished process (``ru_maxrss`` from
``wait4``), taken by a small launcher that forks the command, so the figure is the command's
own and not the bench's (a child started with vfork inherits its parent's high-water mark);
while it runs, /proc/PID/status is polled and the command is killed ("cut off") above
``--rss-cap`` (default 2G) or after ``--timeout`` seconds (default 60).

State written for the 20 writes: the agent runs under ``strace -f -y`` (write-family system
calls and fsyncs, with the path of each descriptor), from just before the first write until
``--settle`` seconds after the last (default 5: two of the agent's periodic checkpoints), and
the bytes handed to each file are summed: files under the volume's state directory except
``log/`` (the maps and records: "state"), ``log/`` (the replication log: "log"), the device,
the rest.  Stores into a shared writable memory mapping are not system calls: the trace also
shows every such ``mmap`` of a state file, and the row says so when there was one (the figure
is then a lower bound).  The kernel's own count (/proc/PID/io ``write_bytes``) is not used: it
counts whole page-cache folios dirtied, and one 4 KiB write into a cached device file counts as
up to 2 MiB here.  What the agent writes when it is stopped afterwards is counted apart ("at
stop").  The agent's start is timed in a separate run without strace.

``--rev REV`` measures the drtool of a commit (``git archive`` into the scratch directory, put
first on PYTHONPATH) instead of this checkout's.  Scratch files go under $DRTOOL_BENCH_DIR or
bench/results/ (on the disk: check it is not tmpfs) and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import scratch_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RS = 64 << 10
EXTENTS = 16
EXTENT = 64 << 20
WRITES = 20
WRITE_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30
SAVE_INTERVAL = 2.0  # drtool.agent.SAVE_INTERVAL (not imported: the bench may measure another tree)

#: Targets of issue 10, for the 15 TiB row; each row there within 2x of the 1 GiB row, init excepted.
COMMAND_RSS = 128 * MiB
AGENT_RSS = 384 * MiB
STATUS_SECONDS = 1.0
RECOVER_SECONDS = 1.0
STATE_BYTES = 1 * MiB

# Forks the command (a fresh process of its own, not a vfork of the bench), reports its pid,
# then its wait status, peak RSS (KiB) and wall seconds on the descriptor given.
LAUNCHER = r"""
import ctypes, os, signal, sys, time
prctl = ctypes.CDLL(None).prctl
prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: gone with the bench
fd = int(sys.argv[1])
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        prctl(1, signal.SIGKILL)  # and the command with its launcher
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
os.write(fd, b"%d\n" % pid)
_, status, usage = os.wait4(pid, 0)
os.write(fd, b"%d %d %.6f %.6f\n" % (status, usage.ru_maxrss, time.monotonic() - start,
                                     usage.ru_utime + usage.ru_stime))
"""


# -- measured processes -----------------------------------------------------------------------

@dataclass
class Measured:
    """One finished process: exit code (negative: killed by that signal), wall seconds, peak RSS
    in bytes, and why it was cut off (None if it ran to its end)."""

    code: int
    seconds: float
    peak_rss: int
    cut: str | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: bytes = b""
    cpu: float | None = None  # user + system seconds

    def json(self) -> dict:
        return json.loads(self.stdout)


def _proc_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


class Child:
    """A command started through the launcher, watched: killed above ``rss_cap`` bytes of RSS or
    after ``timeout`` seconds.  ``watch_pid`` may be changed (to a grandchild, under strace)."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0,
                 rss_cap: int = 2 * GiB, tracer: bool = False, **popen: object) -> None:
        self.tracer = tracer
        popen.setdefault("cwd", os.path.dirname(REPO))  # not the checkout: `-m drtool` would import from the cwd
        read, write = os.pipe()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(write), *argv],
                                     pass_fds=(write,), env=env, **popen)  # type: ignore[arg-type]
        os.close(write)
        self.report = os.fdopen(read, "rb")
        line = self.report.readline()
        if not line:
            raise RuntimeError(f"the launcher did not start {argv[0]}")
        self.pid = int(line)
        self.watch_pid = self.pid
        self.timeout = timeout
        self.rss_cap = rss_cap
        self.cut: str | None = None
        self.hwm = 0
        self._done = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            values = _proc_status(self.watch_pid)
            if self.watch_pid == self.pid or values:
                self.hwm = max(self.hwm, values.get("VmHWM", 0))
            if values.get("VmRSS", 0) > self.rss_cap and not self.cut:
                self.cut = f"cut off: RSS over {self.rss_cap // MiB} MiB"
                self._kill()
            elif time.monotonic() - self.started > self.timeout and not self.cut:
                self.cut = f"cut off: over {self.timeout:g} s"
                self._kill()

    def _kill(self) -> None:
        """SIGKILL what is watched; a tracer (``tracer=True``) gets SIGTERM, so that it ends its tracee
        too (strace sends its own child the signal it got) instead of leaving it to run untraced."""
        kills = [(self.watch_pid, signal.SIGKILL)] if self.watch_pid != self.pid else []
        kills.append((self.pid, signal.SIGTERM if self.tracer else signal.SIGKILL))
        for pid, signum in kills:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.watch_pid, signum)
        except ProcessLookupError:
            pass

    def finish(self, stdout: bytes = b"", stderr: bytes = b"") -> Measured:
        self.proc.wait()
        self._done.set()
        self._watcher.join()
        line = self.report.readline().split()
        self.report.close()
        if len(line) != 4:
            return Measured(-9, time.monotonic() - self.started, self.hwm, self.cut or "launcher killed",
                            stdout.decode(errors="replace"), stderr.decode(errors="replace"), stdout)
        status, maxrss_kib, seconds, cpu = int(line[0]), int(line[1]), float(line[2]), float(line[3])
        return Measured(os.waitstatus_to_exitcode(status), seconds, max(maxrss_kib * 1024, self.hwm), self.cut,
                        stdout.decode(errors="replace"), stderr.decode(errors="replace"), stdout, cpu)

    def stop(self, timeout: float = 60.0) -> Measured:
        """SIGTERM the command; SIGKILL if it has not gone within ``timeout``."""
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        return self.finish()


def run_measured(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60.0,
                 rss_cap: int = 2 * GiB, input: bytes | None = None, cwd: str | None = None) -> Measured:
    """Run a command to its end (or its cut-off); its output captured."""
    child = Child(argv, env, timeout, rss_cap, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or os.path.dirname(REPO))
    out, err = child.proc.communicate(input)
    return child.finish(out, err)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except FileNotFoundError:
        return []


def _lock_holder(state_dir: str, ancestor: int) -> int:
    """The pid a volume's lock file names, checked to be a child of ``ancestor`` (strace)."""
    with open(os.path.join(state_dir, "lock")) as handle:
        pid = int(handle.read().split()[0])
    with open(f"/proc/{pid}/status") as handle:
        parent = next(int(line.split()[1]) for line in handle if line.startswith("PPid:"))
    if parent != ancestor:
        raise RuntimeError(f"the volume's lock names pid {pid}, not a child of {ancestor}")
    return pid


# -- a minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) -------------------------

class NbdClient:
    IHAVEOPT = 0x49484156454F5054
    OPT_REPLY_MAGIC = 0x3E889045565A9
    REQUEST_MAGIC = 0x25609513
    REPLY_MAGIC = 0x67446698
    CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3

    def __init__(self, path: str, name: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self._handshake(name)
        except BaseException:
            self.sock.close()
            raise
        self.handle = 0

    def _recv(self, length: int) -> bytes:
        data = bytearray()
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            if not chunk:
                raise ConnectionError("the NBD server closed the connection")
            data += chunk
        return bytes(data)

    def _handshake(self, name: str) -> None:
        magic, opt, _flags = struct.unpack(">8sQH", self._recv(18))
        if magic != b"NBDMAGIC" or opt != self.IHAVEOPT:
            raise ConnectionError("not a newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
        encoded = name.encode()
        payload = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", self.IHAVEOPT, 7, len(payload)) + payload)  # NBD_OPT_GO
        while True:
            magic, _opt, reply, length = struct.unpack(">QIII", self._recv(20))
            data = self._recv(length)
            if magic != self.OPT_REPLY_MAGIC:
                raise ConnectionError("bad option reply")
            if reply == 1:  # NBD_REP_ACK
                return
            if reply & 0x80000000:
                raise ConnectionError(f"NBD_OPT_GO refused ({reply:#x}): {data!r}")

    def _request(self, command: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, command, self.handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != self.REPLY_MAGIC or handle != self.handle:
            raise ConnectionError("bad NBD reply")
        if error:
            raise OSError(error, f"NBD command {command} at {offset} failed")
        return self._recv(length) if command == self.CMD_READ else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._request(self.CMD_READ, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._request(self.CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        self._request(self.CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", self.REQUEST_MAGIC, 0, self.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


def wait_nbd(path: str, name: str, child: Child, timeout: float) -> float | None:
    """Seconds from the child's start until a handshake on ``path`` succeeds (None: it never did)."""
    while time.monotonic() - child.started < timeout and child.proc.poll() is None:
        try:
            NbdClient(path, name, timeout=5).close()
            return time.monotonic() - child.started
        except OSError:
            time.sleep(0.01)
    return None


# -- strace accounting ---------------------------------------------------------------------------

_TRACE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((\d+)<([^>]*)>")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>")
TRACED = "write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sync_file_range,mmap"
_SHARED_MAP = re.compile(r"^mmap\(.*PROT_WRITE.*MAP_SHARED.*?, (\d+)<([^>]*)>")


@dataclass
class Written:
    bytes: dict[str, int] = field(default_factory=dict)
    fsyncs: dict[str, int] = field(default_factory=dict)
    mapped: set[str] = field(default_factory=set)
    files: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, category: str, syscall: str, result: int, path: str = "") -> None:
        if syscall in ("fsync", "fdatasync", "sync_file_range"):
            self.fsyncs[category] = self.fsyncs.get(category, 0) + 1
        elif result > 0:
            self.bytes[category] = self.bytes.get(category, 0) + result
            name = re.sub(r"\.tmp\.\d+$", ".tmp.PID", re.sub(r"[0-9a-f]{12,}", "N", os.path.basename(path)))
            self.files[category, name] = self.files.get((category, name), 0) + result

    def top(self, category: str, count: int = 3) -> str:
        """The files of a category that took the most bytes."""
        ranked = sorted(((n, b) for (c, n), b in self.files.items() if c == category), key=lambda item: -item[1])
        return ", ".join(f"{name} {fmt_bytes(size)}" for name, size in ranked[:count])


def account_trace(path: str, categorize, windows: list[tuple[float, float]]) -> list[Written]:
    """Sum an ``strace -f -ttt -y`` file's written bytes and fsyncs by category, one Written per
    time window (a call counts in the window its start falls in)."""
    totals = [Written() for _ in windows]
    pending: dict[str, tuple[str, str, float]] = {}
    with open(path, errors="replace") as handle:
        for line in handle:
            match = _TRACE.match(line.rstrip("\n"))
            if not match:
                continue
            pid, stamp, rest = match.group(1), float(match.group(2)), match.group(3)
            mapping = _SHARED_MAP.match(rest)
            if mapping:
                for total in totals:  # a mapping made before a window is used in it
                    total.mapped.add(categorize(mapping.group(2)))
                continue
            call = _CALL.match(rest)
            if call and rest.endswith("<unfinished ...>"):
                pending[pid] = (call.group(1), call.group(3), stamp)
                continue
            if call:
                syscall, target = call.group(1), call.group(3)
            elif _RESUMED.match(rest) and pid in pending:
                syscall, target, stamp = pending.pop(pid)
            else:
                continue
            try:
                result = int(rest.rsplit(" = ", 1)[1].split()[0])
            except (IndexError, ValueError):
                continue
            for window, total in zip(windows, totals):
                if window[0] <= stamp < window[1]:
                    total.add(categorize(target), syscall, result, target)
    return totals


# -- one size ----------------------------------------------------------------------------------

def extent_offset(size: int, index: int) -> int:
    return max(0, min(size - EXTENT, (size // EXTENTS * index) // EXTENT * EXTENT))


def make_device(path: str, size: int) -> None:
    """A sparse file of ``size`` with 16 extents of 64 MiB of random bytes; durable."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index in range(EXTENTS):
            handle.seek(extent_offset(size, index))
            handle.write(os.urandom(EXTENT))
        handle.flush()
        os.fsync(handle.fileno())


def write_offsets(size: int) -> list[int]:
    """20 4 KiB-aligned offsets spread over the whole volume, each in a region of its own,
    some in the data extents and some in holes."""
    step = size // WRITES
    return [(index * step + (index * 12288) % RS) // WRITE_SIZE * WRITE_SIZE for index in range(WRITES)]


class Step:
    """A row: what ran, how it ended, its figures."""

    def __init__(self, name: str, key: str, result: Measured | None = None, note: str = "",
                 value: float | None = None, unit: str = "s", rss: int | None = None,
                 expect: tuple[int, ...] = (0,)) -> None:
        self.name = name
        self.key = key
        self.note = note
        self.expect = expect
        self.code = result.code if result else None
        self.cut = result.cut if result else None
        self.value = value if value is not None else (result.seconds if result else None)
        self.unit = unit
        self.rss = rss if rss is not None else (result.peak_rss if result else None)
        self.samples = [self.value] if self.value is not None and unit == "s" else []
        self.cpu_samples = [result.cpu] if result and result.cpu is not None and unit == "s" else []
        self.extra = ""
        if result and not result.cut and result.code not in expect:
            self._unexpected(result)

    def _unexpected(self, result: Measured) -> None:
        self.note = (self.note + "; " if self.note else "") + f"unexpected exit {result.code}: " + \
            (result.stderr.strip().splitlines() or ["(no message)"])[-1][:200]

    def add(self, result: Measured, value: float | None = None) -> None:
        """Another run of the same step: the median of the times, the largest peak RSS; a failed
        run makes the row failed."""
        if not self.ok:
            return
        self.rss = max(self.rss or 0, result.peak_rss)
        if result.cut or result.code not in self.expect:
            self.code, self.cut = result.code, result.cut
            if not result.cut:
                self._unexpected(result)
            return
        self.samples.append(value if value is not None else result.seconds)
        self.value = statistics.median(self.samples)
        if result.cpu is not None:
            self.cpu_samples.append(result.cpu)

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpu_samples) if self.cpu_samples else None

    @property
    def ok(self) -> bool:
        return self.code is not None and self.cut is None and self.code in self.expect

    def to_json(self) -> dict:
        return {"name": self.name, "key": self.key, "code": self.code, "cut": self.cut, "value": self.value,
                "samples": self.samples, "unit": self.unit, "rss": self.rss, "note": self.note, "ok": self.ok,
                "extra": self.extra, "expect": list(self.expect), "cpu_samples": self.cpu_samples}

    @classmethod
    def from_json(cls, data: dict) -> Step:
        step = cls(data["name"], data["key"], note=data.get("note", ""), unit=data.get("unit", "s"),
                   expect=tuple(data.get("expect") or ((0,) if data.get("ok") else ())))
        step.code, step.cut, step.value, step.rss = data["code"], data["cut"], data["value"], data["rss"]
        step.samples, step.extra = data.get("samples") or [], data.get("extra", "")
        step.cpu_samples = data.get("cpu_samples") or []
        if data.get("ok") and step.code not in step.expect:
            step.expect = (step.code,)
        return step


class SizeRun:
    def __init__(self, size: int, label: str, base: str, env: dict[str, str], args: argparse.Namespace) -> None:
        self.size = size
        self.label = label
        self.work = scratch_dir(f"scale-{label}-")
        self.env = {**env, "DRTOOL_STATE_ROOT": os.path.join(self.work, "state")}
        self.state_dir = os.path.join(self.work, "state", "vol")
        self.device = os.path.join(self.work, "dev.img")
        self.args = args
        self.steps: list[Step] = []
        self.drtool = [sys.executable, "-m", "drtool"]

    def cmd(self, name: str, key: str, *argv: str, expect: tuple[int, ...] = (0,), runs: int = 1) -> Measured:
        """Run a drtool command ``runs`` times (stopping at a failed run); a step run again later
        (the same ``key``) adds to its row."""
        step = next((s for s in self.steps if s.key == key), None)
        for _ in range(runs):
            result = run_measured([*self.drtool, *argv], self.env, self.args.timeout, self.args.rss_cap,
                                  cwd=self.work)
            if step is None:
                step = Step(name, key, result, expect=expect)
                self.steps.append(step)
            else:
                step.add(result)
            print(f"  {name}: exit {result.code}, {result.cut or f'{result.seconds:.2f} s'}, "
                  f"peak RSS {fmt_bytes(result.peak_rss)}", flush=True)
            if not step.ok:
                break
        return result

    def skip(self, name: str, key: str, why: str) -> None:
        self.steps.append(Step(name, key, note=why if why.startswith("failed") else f"not run: {why}"))
        print(f"  {name}: not run ({why})", flush=True)

    def categorize(self, path: str) -> str:
        if path == self.device:
            return "device"
        if path.startswith(os.path.join(self.state_dir, "log") + "/"):
            return "log"
        if path == os.path.join(self.state_dir, "overlay.img"):
            return "overlay"
        if path.startswith(self.state_dir + "/"):
            return "state"
        return "other"

    def run(self) -> None:
        print(f"\n== {self.label}: {self.size} bytes, {self.size // RS} regions ({time.strftime('%H:%M:%S')})",
              flush=True)
        make_device(self.device, self.size)
        token = os.path.join(self.work, "token")
        with open(token, "w") as handle:
            handle.write(os.urandom(16).hex())
        os.chmod(token, 0o600)
        server = Child([*self.drtool, "serve", "--root", os.path.join(self.work, "replica"), "--listen", "127.0.0.1:0",
                        "--token-file", token], self.env, timeout=3600, rss_cap=self.args.rss_cap,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=self.work)
        try:
            line = server.proc.stdout.readline()
            found = re.search(r"listening on ([\d.]+:\d+)", line)
            if not found:
                raise SystemExit(f"drtool serve did not start: {line!r}")
            self.url = f"http://{found.group(1)}"
            self.token = token
            self._steps()
        finally:
            served = server.stop(timeout=30)
            self.steps.append(Step("replica server (serve), whole run", "serve", value=None, unit="",
                                   rss=served.peak_rss, note=served.cut or "", expect=(0, -15)))
            self.steps[-1].code, self.steps[-1].cut = served.code, served.cut
            print(f"  replica server: peak RSS {fmt_bytes(served.peak_rss)}", flush=True)

    def _steps(self) -> None:
        runs = self.args.runs
        init = self.cmd("init", "init", "init", "vol", "--device", self.device, "--region-size", "64K", "--json")
        if not (init.cut or init.code != 0) and runs > 1:  # again, over the first: the same work
            init = self.cmd("init", "init", "init", "vol", "--device", self.device, "--region-size", "64K",
                            "--force", "--json", runs=runs - 1)
        if init.cut or init.code != 0:
            for name, key in (("checkpoint", "checkpoint"), ("protect", "protect"), ("agent start", "agent"),
                              ("status --json", "status"), ("scrub", "scrub"), ("recover", "recover"),
                              ("failback", "failback")):
                self.skip(name, key, "init did not finish")
            return
        self.cmd("checkpoint", "checkpoint", "checkpoint", "vol", "--json", runs=runs)
        protect = self.cmd("protect (initial sync of 1 GiB)", "protect", "protect", "vol", "--peer", self.url,
                           "--token-file", self.token, "--json")
        self.syncing = bool(protect.cut or protect.code != 0)
        self._agent()
        self.cmd("status --json", "status", "status", "vol", "--json", runs=runs)
        for cycle in range(runs):  # an incident, the same work each time: a region of extent 3 goes bad
            with open(self.device, "r+b") as handle:
                handle.seek(extent_offset(self.size, 3) + (5 + cycle) * RS + 100)
                handle.write(os.urandom(64))
            scrub = self.cmd("scrub (1 region corrupted: exit 3)", "scrub", "scrub", "vol", "--json", expect=(3,))
            recover = self.cmd("recover", "recover", "recover", "vol", "--json")
            if scrub.cut or scrub.code != 3 or recover.cut or recover.code != 0:
                if not any(s.key == "failback" for s in self.steps):
                    self.skip("failback", "failback", "scrub or recover did not finish")
                return
            failback = self.cmd("failback (1 region)", "failback", "failback", "vol", "--json")
            if failback.cut or failback.code != 0:
                return

    def _agent(self) -> None:
        sock = os.path.join(self.work, "nbd.sock")
        argv = [*self.drtool, "agent", "vol", "--nbd-socket", sock, "--listen", "none"]
        log = open(os.path.join(self.work, "agent.log"), "ab")
        # 1. the start, without strace
        step = None
        for _ in range(self.args.runs):
            child = Child(argv, self.env, self.args.timeout, self.args.rss_cap, stdout=subprocess.DEVNULL,
                          stderr=log, cwd=self.work)
            ready = wait_nbd(sock, "vol", child, self.args.timeout)
            started = child.stop()
            if ready is None and not started.cut:
                started.cut = "never answered" if started.code in (0, -15) else None
            if step is None:
                step = Step("agent start (until NBD answers)", "agent", started, value=ready, expect=(0, -15))
                self.steps.append(step)
            else:
                step.add(started, ready)
            step.cpu_samples = []  # the whole run's, not the start's
            print(f"  agent start: {describe(step)}", flush=True)
            if ready is None:
                break
        if ready is None:
            self.skip("agent: 20 x 4 KiB writes", "writes", "the agent did not start")
            return
        # 2. the writes, under strace
        trace = os.path.join(self.work, "agent.strace")
        child = Child(["strace", "-f", "--seccomp-bpf", "-qq", "-ttt", "-y", "-e", f"trace={TRACED}", "-o", trace,
                       *argv], self.env, self.args.timeout + self.args.settle + WRITES * self.args.write_interval,
                      self.args.rss_cap, tracer=True, stdout=subprocess.DEVNULL, stderr=log, cwd=self.work)
        try:
            self._writes(child, sock, trace)
        except Exception as exc:  # noqa: BLE001 - a row saying what broke
            self.skip("agent: 20 x 4 KiB writes", "state", f"failed: {type(exc).__name__}: {exc}")
        finally:
            if child.proc.poll() is None:  # the agent first: strace gone, it would run on untraced
                child.stop()

    def _writes(self, child: Child, sock: str, trace: str) -> None:
        if wait_nbd(sock, "vol", child, self.args.timeout) is None:
            result = child.stop()
            self.skip("agent: 20 x 4 KiB writes", "state", result.cut or "the traced agent did not start")
            return
        agent_pid = _lock_holder(self.state_dir, child.pid)
        child.watch_pid = agent_pid
        time.sleep(0.5)
        rng = random.Random(20)
        blocks = {offset: rng.randbytes(WRITE_SIZE) for offset in write_offsets(self.size)}
        t0 = time.time()
        client = NbdClient(sock, "vol")
        try:
            for index, (offset, data) in enumerate(blocks.items()):
                if index:
                    time.sleep(self.args.write_interval)
                client.write(offset, data)
                client.flush()
            wrong = [offset for offset, data in blocks.items() if client.read(offset, WRITE_SIZE) != data]
        finally:
            client.close()
        time.sleep(self.args.settle)
        t1 = time.time()
        hwm = _proc_status(agent_pid).get("VmHWM", 0)
        stopped = child.stop()
        t2 = time.time()
        window, at_stop = account_trace(trace, self.categorize, [(t0, t1), (t1, t2 + 1)])
        notes = [f"read back wrong at {wrong}"] if wrong else []
        if window.bytes.get("device", 0) != WRITES * WRITE_SIZE:
            notes.append(f"device written: {window.bytes.get('device', 0)} bytes")
        if self.syncing:
            notes.append("the agent was still doing the initial sync (protect was cut off)")
        if window.mapped & {"state", "log"}:
            notes.append("state files mapped shared-writable: stores through them are not counted")
        note = "; ".join(notes)
        agent = next(s for s in self.steps if s.key == "agent")
        agent.rss = max(agent.rss or 0, hwm, stopped.peak_rss)  # the agent's peak, in every run
        rows = [
            ("agent: state written for 20 x 4 KiB writes (excl. log)", "state", window.bytes.get("state", 0),
             "; ".join(x for x in (f"{window.fsyncs.get('state', 0)} fsyncs", window.top("state")) if x)),
            ("agent: replication log written", "log", window.bytes.get("log", 0),
             f"{window.fsyncs.get('log', 0)} fsyncs"),
            ("agent: state written at stop (excl. log)", "stop", at_stop.bytes.get("state", 0),
             f"{at_stop.fsyncs.get('state', 0)} fsyncs"),
        ]
        for index, (name, key, value, extra) in enumerate(rows):
            step = Step(name, key, stopped, value=value, unit="B", rss=None, expect=(0, -15),
                        note=note if index == 0 else "")
            step.rss = None
            step.extra = extra
            self.steps.append(step)
            print(f"  {name}: {fmt_bytes(value)} {extra}", flush=True)
        if window.bytes.get("overlay") or window.bytes.get("other", 0) > 1024:
            print(f"  (also written: {window.bytes})", flush=True)

    def cleanup(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


# -- report ------------------------------------------------------------------------------------

def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= GiB:
        return f"{value / GiB:.2f} GiB"
    if value >= MiB:
        return f"{value / MiB:.1f} MiB"
    if value >= 1024:
        return f"{value / 1024:.0f} KiB"
    return f"{value:.0f} B"


def fmt_value(step: Step) -> str:
    if step.cut:
        return step.cut
    if step.value is None:
        return step.note or "-"
    if step.unit == "B":
        return fmt_bytes(step.value) + (f" ({step.extra})" if step.extra else "")
    if len(step.samples) > 1:
        return f"{step.value:.2f} s ({min(step.samples):.2f}-{max(step.samples):.2f})"
    return f"{step.value:.2f} s"


def describe(step: Step) -> str:
    parts = [f"exit {step.code}", fmt_value(step), f"peak RSS {fmt_bytes(step.rss)}"]
    if step.note and not step.note.startswith("not run"):
        parts.append(step.note)
    return ", ".join(parts)


TARGETS = {
    "init": ("RSS <= 128 MiB", lambda s: s.rss is not None and s.rss <= COMMAND_RSS, False),
    "checkpoint": ("RSS <= 128 MiB", lambda s: s.rss is not None and s.rss <= COMMAND_RSS, True),
    "protect": ("RSS <= 128 MiB", lambda s: s.rss is not None and s.rss <= COMMAND_RSS, True),
    "agent": ("RSS <= 384 MiB", lambda s: s.rss is not None and s.rss <= AGENT_RSS, True),
    "state": ("<= 1 MiB", lambda s: s.value is not None and s.value <= STATE_BYTES, True),
    "log": ("(what the log holds)", None, False),
    "stop": ("", None, False),
    "status": ("<= 1 s, RSS <= 128 MiB",
               lambda s: s.value is not None and s.value <= STATUS_SECONDS and (s.rss or 0) <= COMMAND_RSS, True),
    "scrub": ("RSS <= 128 MiB", lambda s: s.rss is not None and s.rss <= COMMAND_RSS, True),
    "recover": ("<= 1 s, RSS <= 128 MiB",
                lambda s: s.value is not None and s.value <= RECOVER_SECONDS and (s.rss or 0) <= COMMAND_RSS, True),
    "failback": ("RSS <= 128 MiB", lambda s: s.rss is not None and s.rss <= COMMAND_RSS, True),
    "serve": ("(item 5: proportional to the batch)", None, False),
}


def table(label: str, steps: list[Step], baseline: dict[str, Step] | None) -> list[str]:
    lines = [f"**{label}**", "",
             "| step | exit | result | CPU s | peak RSS | vs 1 GiB (result / RSS) | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for step in steps:
        target, check, relative = TARGETS.get(step.key, ("", None, False))
        met = ""
        ratio = ""
        base = baseline.get(step.key) if baseline else None
        within = True
        if base is not None and base is not step and step.ok and base.ok:
            parts = []
            for mine, theirs in ((step.value, base.value), (step.rss, base.rss)):
                if mine is not None and theirs:
                    parts.append(f"x{mine / theirs:.1f}")
                    within = within and mine <= 2 * theirs
                else:
                    parts.append("-")
            ratio = " / ".join(parts)
        if check is not None:
            good = step.ok and check(step) and (within or not relative)
            met = "yes" if good else "**no**"
            if relative and baseline is not None and base is not step:
                target += ", <= 2x 1 GiB"
        code = "" if step.code is None else str(step.code)
        cpu = "" if step.cpu is None or step.cut else f"{step.cpu:.2f}"
        lines.append(f"| {step.name} | {code} | {fmt_value(step)} | {cpu} | {fmt_bytes(step.rss)} | {ratio} "
                     f"| {target} | {met} |")
    for step in steps:
        if step.note and not step.note.startswith("not run"):
            lines.append(f"\n{step.name}: {step.note}")
    return lines


def matrix(results: dict[str, list[Step]]) -> list[str]:
    """Every step by size, in one table: result / peak RSS."""
    sizes = list(results)
    lines = ["| step | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    keys = list(dict.fromkeys(step.key for steps in results.values() for step in steps))
    for key in keys:
        cells = []
        name = key
        for label in sizes:
            step = next((s for s in results[label] if s.key == key), None)
            if step is None:
                cells.append("not run")
                continue
            name = step.name if step.ok or name == key else name
            if step.note.startswith("not run"):
                cells.append("not run")
                continue
            text = fmt_value(step).replace("cut off: ", "cut off, ")
            if step.rss and not step.cut:
                text += f" / {fmt_bytes(step.rss)}"
            elif step.cut and step.rss:
                text += f" (at {fmt_bytes(step.rss)})"
            if step.code is not None and not step.cut and step.code not in step.expect:
                text += f", exit {step.code}"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render(path: str) -> None:
    """Print the tables of a --json file again."""
    with open(path) as handle:
        data = json.load(handle)
    results = {label: [Step.from_json(s) for s in steps] for label, steps in data["sizes"].items()}
    print(f"drtool at {data['revision']}, {data['date']}, medians of {data.get('runs', 1)} runs\n")
    _print_tables(results)


def _print_tables(results: dict[str, list[Step]]) -> None:
    first = next(iter(results), None)
    baseline = None
    if first and labels(first)[0][1] == GiB:
        baseline = {step.key: step for step in results[first]}
    for label, steps in results.items():
        print("\n".join(table(f"{label} sparse volume ({labels(label)[0][1] // RS} regions)", steps,
                              baseline if label != first else None)))
        print()
    print("\n".join(matrix(results)))
    print()


def labels(text: str) -> list[tuple[str, int]]:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    out = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("IB").removesuffix("B")
        out.append((part, int(float(part[:-1]) * units[part[-1]]) if part[-1] in units else int(part)))
    return out


def source_tree(rev: str, base: str) -> str:
    """``git archive`` of REV's drtool package into a scratch directory; returns it."""
    target = scratch_dir("scale-src-")
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "drtool"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return target


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1G,256G,4T,15T")
    parser.add_argument("--rev", help="measure this commit's drtool instead of the checkout's")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of each command but protect and the writes (median; largest peak RSS)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a command is cut off")
    parser.add_argument("--rss-cap", default="2G", help="RSS above which a command is cut off")
    parser.add_argument("--write-interval", type=float, default=0.5, help="seconds between the 20 writes")
    parser.add_argument("--settle", type=float, default=2 * SAVE_INTERVAL + 1,
                        help="seconds counted after the last write (the agent checkpoints every 2 s)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--render", metavar="FILE", help="print the tables of an earlier --json file; run nothing")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return {}
    args.rss_cap = labels(args.rss_cap)[0][1]
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/scale.py: terminated"))  # clean up
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> dict:
    if shutil.which("strace") is None:
        raise SystemExit("bench/scale.py needs strace (apt-get install strace)")
    env = dict(os.environ)
    source = None
    package = os.path.join(REPO, "drtool")
    if args.rev:
        source = source_tree(args.rev, REPO)
        env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
        package = os.path.join(source, "drtool")
        revision = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", args.rev], capture_output=True,
                                  text=True).stdout.strip()
    else:
        revision = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True,
                                  text=True).stdout.strip()
    # Byte-compiled once, into a scratch cache (not the tree): every command's start-up is then a
    # deployed one, and not a compile of drtool's sources (PYTHONDONTWRITEBYTECODE may be set).
    cache = scratch_dir("scale-pycache-")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = cache
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"drtool at {revision}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"cut off at {args.timeout:g} s or {fmt_bytes(args.rss_cap)} RSS; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, list[Step]] = {}
    try:
        for label, size in labels(args.sizes):
            run = SizeRun(size, label, REPO, env, args)
            try:
                run.run()
            finally:
                if not args.keep:
                    run.cleanup()
            results[label] = run.steps
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
            if source:
                shutil.rmtree(source, ignore_errors=True)
    print(f"\ndrtool at {revision}, 64 KiB regions, 1 GiB allocated in each volume, medians of {args.runs} runs "
          f"(min-max); load average at the end {os.getloadavg()[0]:.1f}; targets of issue 10 (stated for 15 TiB)\n")
    _print_tables(results)
    out = {"revision": revision, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs,
           "sizes": {label: [s.to_json() for s in steps] for label, steps in results.items()}}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
