"""The fault suite (issue 11, "How it is proven"): kill -9 of the agent and of the replica server
at random points during writes, replication, recover and failback, then proof that nothing
acknowledged was lost and that the replica equals the primary.

Real processes only: a `drtool serve` subprocess (the replica server), a `drtool agent`
subprocess serving the volume over NBD on its Unix socket and replicating in the background,
a writer thread speaking NBD through that socket (tests/nbd/rawclient.py: WRITE, FUA,
FLUSH, WRITE_ZEROES, TRIM), and `drtool failback` as an operator runs it.  Each seed runs one
volume through three phases, one crash point each:

1. **normal**: random writes with replication running; kill -9 the agent, the replica
   server or both at a random moment; then, all acknowledged, kill -9 the replica server
   again (its batches durable in its journal past the mirror's checkpoint: the restart
   replays them);
2. **recover**: some regions rot on the device behind drtool's back, `drtool recover` is asked
   while the writer keeps writing, and the kill lands before, during or after it, or among
   the degraded writes that follow;
3. **failback**: `drtool failback --device NEW --rate R` (NEW blank, or a stale copy of the
   device) with the writer still writing; the kill lands in the scrub of NEW, the copy, the
   rate's pause or the finish; then more writes, and the failback is run again to its end
   with the writer still writing (its finish shuts writes out while it copies the last
   regions: tests/faults/test_failback_race.py), which stops only after it.

After each crash what was killed is restarted and the operation finished, and then:

- every flushed (or FUA) write reads back through the restarted agent's export: each byte
  equals the model's durable byte, or the byte of a write that was not durable (not yet
  flushed, in flight or unflushed at a kill, or answered with an error);
- `drtool replicate --wait`, then `drtool verify vol --json` exits 0 and lists no region
  that differs;
- the replica equals the primary byte for byte: the mirror image against the device in
  normal mode and after failback, the replica's merged view (overlay replica over the
  mirror) against the model in degraded mode;
- at the end a fresh agent (stopped cleanly, started again) serves exactly the model.

The model of what a read must return is kept by the writer (``Model``).  Seeds: the run uses
DRTOOL_FAULT_SEED (default below) plus the iteration; a failure names its seed and the
phase, and ``DRTOOL_FAULT_SEED=S DRTOOL_FAULT_ITERATIONS=1`` replays the same choices (the
moments of the kills are chosen by the seed, yet where they land depends on the machine's
speed: the crash log in fault-report.json says where each one landed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

from drtool import api
from drtool.nbd import protocol as p
from tests.conftest import DRTOOL
from tests.nbd.rawclient import RawClient

pytestmark = pytest.mark.slow

RS = 65536
BASE_SEED = int(os.environ.get("DRTOOL_FAULT_SEED", "20261206"))
ITERATIONS = int(os.environ.get("DRTOOL_FAULT_ITERATIONS", "6"))
READ_CHUNK = 1 << 20


# -- the model of what the volume must hold --------------------------------------------------


class Model:
    """The bytes a read must return after a crash, write by write.

    ``durable`` holds every write the server has made durable (acknowledged before an
    acknowledged FLUSH, or acknowledged with FUA); ``maybe`` holds, in order, the writes that
    are not (yet) durable: acknowledged but not flushed, in flight when the server died, or
    answered with an error (their bytes are undefined: old or new).  After a crash each byte
    must equal ``durable`` or one of the ``maybe`` writes covering it that came after the last
    durable write of that byte.  Thread-safe (the writer updates it, the test checks it)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.durable = bytearray(data)
        self.maybe: list[list] = []  # [offset, bytes, failed]
        self.lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.durable)

    def sent(self, offset: int, data: bytes) -> list:
        entry = [offset, data, False]
        with self.lock:
            self.maybe.append(entry)
        return entry

    def failed(self, entry: list) -> None:
        with self.lock:
            entry[2] = True

    def made_durable(self, entry: list) -> None:
        """A FUA write was acknowledged: its bytes are durable, and earlier writes under it
        can no longer show through."""
        with self.lock:
            offset, data, _ = entry
            self.durable[offset:offset + len(data)] = data
            index = next(i for i, e in enumerate(self.maybe) if e is entry)
            self.maybe = _trim(self.maybe[:index], offset, offset + len(data)) + self.maybe[index + 1:]

    def flushed(self, upto: int) -> None:
        """A FLUSH sent after the first ``upto`` entries of ``maybe`` was acknowledged."""
        with self.lock:
            done, rest = self.maybe[:upto], self.maybe[upto:]
            kept: list[list] = []
            for offset, data, failed in done:
                if failed:
                    kept.append([offset, data, failed])  # undefined bytes stay undefined
                    continue
                self.durable[offset:offset + len(data)] = data
                kept = _trim(kept, offset, offset + len(data))
            self.maybe = kept + rest

    def crashed(self) -> None:
        """The server died: what was not durable may or may not be there, whatever a later
        FLUSH (on a new connection, to a new process) says."""
        with self.lock:
            for entry in self.maybe:
                entry[2] = True

    def mark(self) -> int:
        with self.lock:
            return len(self.maybe)

    def check(self, actual: bytes) -> list[str]:
        """Bytes that are neither durable nor a not-yet-durable write's: described, at most 10."""
        problems: list[str] = []
        with self.lock:
            assert len(actual) == self.size
            for start in range(0, self.size, RS):
                end = min(start + RS, self.size)
                if actual[start:end] == self.durable[start:end]:
                    continue
                covering = [(o, d) for o, d, _ in self.maybe if o < end and o + len(d) > start]
                bad = [i for i in range(start, end)
                       if actual[i] != self.durable[i]
                       and not any(o <= i < o + len(d) and d[i - o] == actual[i] for o, d in covering)]
                if bad:
                    problems.append(f"region {start // RS}: {len(bad)} bytes from offset {bad[0]} hold neither "
                                    f"a durable write nor a pending one (got {actual[bad[0]]:#04x}, "
                                    f"durable {self.durable[bad[0]]:#04x}, {len(covering)} pending writes there)")
                    if len(problems) >= 10:
                        break
        return problems

    def adopt(self, actual: bytes) -> None:
        """What the restarted server holds is the new truth (flushed right after)."""
        with self.lock:
            self.durable[:] = actual
            self.maybe.clear()


def _trim(entries: list[list], lo: int, hi: int) -> list[list]:
    """``entries`` with the bytes in [lo, hi) cut out (a later durable write covers them)."""
    out: list[list] = []
    for offset, data, failed in entries:
        end = offset + len(data)
        if end <= lo or offset >= hi:
            out.append([offset, data, failed])
            continue
        if offset < lo:
            out.append([offset, data[:lo - offset], failed])
        if end > hi:
            out.append([hi, data[hi - offset:], failed])
    return out


# -- the writer --------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Random writes through the agent's NBD export, FLUSH every few, kept in the model."""

    def __init__(self, sock: Path, model: Model, rng: random.Random, counts: Counter, hot: list[int]) -> None:
        super().__init__(daemon=True, name="nbd-writer")
        self.sock = str(sock)
        self.model = model
        self.rng = rng
        self.counts = counts
        self.hot = hot
        self.stop_event = threading.Event()
        self.trace: list[str] = []  # what was sent and answered, written out when a check fails
        self.error: BaseException | None = None
        self.error_replies: list[tuple[float, int, str]] = []

    def run(self) -> None:
        try:
            with RawClient(self.sock) as client:
                client.connect("vol")
                since_flush = 0
                flush_every = self.rng.randint(1, 6)
                while not self.stop_event.is_set():
                    self._one(client)
                    since_flush += 1
                    if since_flush >= flush_every:
                        mark = self.model.mark()
                        self.counts["flushes_sent"] += 1
                        error = client.command(p.Command.FLUSH)
                        self.trace.append(f"{time.time():.3f} FLUSH -> {error}")
                        if error == 0:
                            self.model.flushed(mark)
                            self.counts["flushes_acked"] += 1
                        else:
                            self.error_replies.append((time.monotonic(), error, "flush"))
                        since_flush, flush_every = 0, self.rng.randint(1, 6)
        except BaseException as exc:  # the agent was killed under it (checked by the caller)
            self.error = exc
            self.model.crashed()  # (again: a write sent after the kill was noted is undefined too)

    def _one(self, client: RawClient) -> None:
        rng, size = self.rng, self.model.size
        region = rng.choice(self.hot) if rng.random() < 0.5 else rng.randrange(size // RS)
        shape = rng.random()
        if shape < 0.25:  # whole regions
            offset, length = region * RS, RS * rng.randint(1, 2)
        elif shape < 0.45:  # whole 4 KiB blocks (degraded: the overlay's block map, no base read)
            blocks = rng.randint(1, 3)
            length, offset = blocks * 4096, region * RS + 4096 * rng.randrange(RS // 4096 - blocks + 1)
        elif shape < 0.8:  # a small piece of a region
            length = rng.choice([512, 4096, rng.randint(1, 12000)])
            offset = region * RS + rng.randrange(RS - length)
        else:  # a piece across a region boundary
            length = rng.randint(RS // 2, 2 * RS)
            offset = region * RS + rng.randrange(RS)
        length = min(length, size - offset)
        fua = rng.random() < 0.15
        flags = p.CommandFlag.FUA if fua else 0
        kind = rng.random()
        if kind < 0.06:
            data, command = bytes(length), p.Command.WRITE_ZEROES
        elif kind < 0.08 and length >= RS:
            offset, length = region * RS, min(RS, size - region * RS)
            data, command = bytes(length), p.Command.TRIM  # whole regions: zeros (drtool's contract)
        else:
            data, command = rng.randbytes(length), p.Command.WRITE
        entry = self.model.sent(offset, data)
        self.counts[f"{command.name.lower()}_sent"] += 1
        self.counts["bytes_sent"] += length
        if command == p.Command.WRITE:
            error = client.write(offset, data, flags)
        else:
            error = client.command(command, offset, length, flags)
        self.trace.append(f"{time.time():.3f} {command.name} {offset}+{length} regions {offset // RS}-"
                          f"{(offset + length - 1) // RS} fua={int(fua)} first={data[:1].hex()} -> {error}")
        if error:
            self.model.failed(entry)
            self.error_replies.append((time.monotonic(), error, f"{command.name} {offset}+{length}"))
            self.counts["error_replies"] += 1
            return
        self.counts["acked"] += 1
        if fua:
            self.model.made_durable(entry)
            self.counts["fua_acked"] += 1

    def stop(self, expect_alive: bool = True) -> None:
        self.stop_event.set()
        self.join(60)
        assert not self.is_alive(), "the writer is stuck"
        if expect_alive and self.error is not None:
            raise AssertionError(f"the writer failed with no kill under it: {self.error!r}") from self.error


# -- one volume through the three phases -------------------------------------------------------


class Run:
    def __init__(self, seed: int, tmp_path: Path, state_root: Path, replica_server, start_agent, cli,
                 stats, path: Path, data: bytearray) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.tmp = tmp_path
        self.state_root = state_root
        self.replica = replica_server
        self.start_agent = start_agent
        self.cli = cli
        self.stats = stats
        self.device = path
        self.size = len(data)
        self.model = Model(data)
        self.agent = start_agent("vol")
        self.writer: Writer | None = None
        self.replica_down: list[list[float]] = []  # [killed at, restarted at]
        count = self.size // RS
        self.hot = self.rng.sample(range(count), 4)
        self.phase = "setup"
        self.trace: list[str] = []

    # processes

    def start_writer(self) -> None:
        self.writer = Writer(self.agent.sock, self.model, random.Random(self.rng.random()), self.stats.inputs,
                             self.hot)
        self.writer.start()

    def stop_writer(self, killed_agent: bool) -> None:
        if self.writer is None:
            return
        self.writer.stop(expect_alive=not killed_agent)
        self.trace += self.writer.trace
        # An error reply is acceptable only while the replica server was down (a degraded
        # read-modify-write of a region that lives only there), or just after.
        for at, error, what in self.writer.error_replies:
            if not any(lo - 0.5 <= at <= (hi if hi else time.monotonic()) + 5 for lo, hi in self.replica_down):
                raise AssertionError(f"{what} answered error {error} while every process was up")
        self.writer = None

    def kill(self, target: str, **info) -> None:
        at = time.monotonic()
        if target in ("agent", "both"):
            self.agent.proc.send_signal(signal.SIGKILL)
        if target in ("replica", "both"):
            self.replica.proc.send_signal(signal.SIGKILL)
            self.replica_down.append([at, 0.0])
        if target in ("agent", "both"):
            self.agent.stop()
            self.model.crashed()
        if target in ("replica", "both"):
            self.replica.stop()
        self.trace.append(f"{time.time():.3f} KILL {target} ({self.phase})")
        self.crash = {"seed": self.seed, "phase": self.phase, "target": target,
                      "in_flight": self.model.mark(), **info}
        self.stats.crashes.append(self.crash)  # the same dict: what is learnt later is added

    def restart(self, target: str, command: subprocess.Popen | None = None) -> None:
        """Start again what was killed.  ``command``: a drtool command started before the kill,
        which runs on the volume by itself when the agent was gone before it asked for it (it
        then holds the volume: the agent starts once it is done)."""
        if target in ("replica", "both"):
            self.replica.start()  # the same port: the agent's peer URL still holds
            self.replica_down[-1][1] = time.monotonic()
        if target in ("agent", "both"):
            try:
                self.agent = self.start_agent("vol")
            except RuntimeError as exc:
                if command is None or "is in use by pid" not in str(exc):
                    raise
                self.crash["landed"] = "before the command reached the agent (it ran by itself)"
                command.wait(120)
                self.agent = self.start_agent("vol")

    def status(self) -> dict:
        return api.status("vol", probe_peer=False)[0]

    def run_cli(self, *argv: str) -> None:
        result = self.cli(*argv)
        assert result.code == 0, f"drtool {' '.join(argv)} exited {result.code}: {result.err or result.out}"
        return result

    # checks

    def read_all(self) -> bytes:
        out = bytearray()
        with RawClient(str(self.agent.sock)) as client:
            client.connect("vol")
            for offset in range(0, self.size, READ_CHUNK):
                length = min(READ_CHUNK, self.size - offset)
                error, data = client.read(offset, length)
                assert error == 0, f"NBD read {offset}+{length} answered error {error}"
                out += data
            assert client.command(p.Command.FLUSH) == 0
        self.stats.checks["bytes_read_back"] += len(out)
        return bytes(out)

    def settle(self) -> bytes:
        """Every durable write reads back through the agent; what it serves becomes the model."""
        actual = self.read_all()
        problems = self.model.check(actual)
        self.stats.checks["read_back_checks"] += 1
        if problems:
            self.stats.mismatches += len(problems)
            (self.tmp / "trace.txt").write_text("\n".join(sorted(self.trace)) + "\n")
            (self.tmp / "served.bin").write_bytes(actual)
            (self.tmp / "model.bin").write_bytes(bytes(self.model.durable))
            raise AssertionError("flushed writes did not read back:\n" + "\n".join(problems))
        self.model.adopt(actual)
        return actual

    def prove_replica(self, merged: bool) -> None:
        """replicate --wait, verify (exit 0, nothing differs), then the replica's bytes."""
        self.run_cli("replicate", "vol", "--wait", "--timeout", "120")
        result = self.cli("verify", "vol", "--json")
        report = json.loads(result.out) if result.out.strip() else {}
        self.stats.checks["verify_runs"] += 1
        if result.code != 0 or report.get("differ") or report.get("result") != "equal":
            self.stats.mismatches += 1
            raise AssertionError(f"verify exited {result.code}: {report or result.err}")
        self.stats.checks["regions_verified"] += report.get("regions_compared", 0)
        with self.replica.client() as client:
            replica = client.read_range("vol", 0, self.size, overlay=merged)
        image = self.replica.root / "vol" / "mirror.img"
        expected = bytes(self.model.durable)
        if replica != expected:
            self.stats.mismatches += 1
            diff = sorted({i // RS for i in range(0, self.size, 512) if replica[i:i + 512] != expected[i:i + 512]})
            raise AssertionError(f"the replica ({'merged view' if merged else 'mirror'}) differs from the "
                                 f"primary in regions {diff}")
        self.stats.checks["replica_byte_compares"] += 1
        if not merged:
            device = Path(self.status()["device"]).read_bytes()
            assert device == expected, "the primary's device differs from what its agent serves"
            assert image.read_bytes() == device, "the mirror image differs from the primary's device"
            self.stats.checks["device_byte_compares"] += 1

    def journal_past_checkpoint(self) -> int:
        """Bytes the replica's journal holds past the mirror's checkpoint (what a replay redoes)."""
        state = json.loads((self.replica.root / "vol" / "applied.json").read_text())
        if not state.get("journal_at"):
            return 0
        first, position = state["journal_at"]
        past = 0
        for segment in (self.replica.root / "vol" / "journal").glob("segment-*.log"):
            number = int(segment.name[8:16])
            if number >= first:
                past += segment.stat().st_size - (position if number == first else 0)
        return past

    # the phases

    def choose_target(self) -> str:
        return self.rng.choice(["agent", "agent", "replica", "both"])

    def normal(self) -> None:
        self.phase = "normal"
        self.start_writer()
        time.sleep(self.rng.uniform(0.2, 1.2))
        target = self.choose_target()
        self.kill(target, landed="writes+replication")
        if target == "replica":
            time.sleep(self.rng.uniform(0.2, 0.8))  # writes go on; the replicator retries
        self.restart(target)
        if target == "replica":
            time.sleep(self.rng.uniform(0.1, 0.5))
        self.stop_writer(killed_agent=target != "replica")
        assert self.status()["mode"] == "normal"
        self.settle()
        self.prove_replica(merged=False)
        self.kill_past_checkpoint()

    def kill_past_checkpoint(self) -> None:
        """kill -9 of the replica server once everything is acknowledged: its batches are durable
        in the journal, the mirror's digests and applied state only at the next checkpoint (a
        journal segment's worth later).  Restarted, it replays them: the replica proves equal."""
        with self.replica.client() as client:
            acknowledged = client.volume_info("vol")["applied_seq"]
        past = self.journal_past_checkpoint()
        self.kill("replica", landed="acknowledged, past the checkpoint" if past else "acknowledged, checkpointed",
                  journal_bytes_past_checkpoint=past)
        if past:
            self.stats.checks["replica_kills_past_checkpoint"] += 1
        self.restart("replica")
        with self.replica.client() as client:
            assert client.volume_info("vol")["applied_seq"] == acknowledged, "an acknowledged batch was lost"
        self.prove_replica(merged=False)

    def recover(self) -> None:
        self.phase = "recover"
        count = self.size // RS
        rotten = self.rng.sample(range(count), self.rng.randint(1, 3))
        with open(self.device, "r+b") as handle:  # the disk rots: drtool must never serve these bytes
            for region in rotten:
                handle.seek(region * RS + self.rng.randrange(RS - 64))
                handle.write(os.urandom(64))
        self.trace.append(f"{time.time():.3f} ROT regions {rotten}")
        self.start_writer()
        time.sleep(self.rng.uniform(0.0, 0.4))
        self.trace.append(f"{time.time():.3f} RECOVER asked")
        outcome: list = []
        asked = threading.Thread(target=lambda: outcome.append(self.cli("recover", "vol", "--json")), daemon=True)
        asked.start()
        # Recover itself takes milliseconds: half the kills aim at it, half at the degraded writes.
        time.sleep(self.rng.uniform(0.0, 0.03) if self.rng.random() < 0.5 else self.rng.uniform(0.05, 1.2))
        target = self.choose_target()
        recover_done = not asked.is_alive() and bool(outcome) and outcome[0].code == 0
        self.kill(target, landed="after recover" if recover_done else "during recover", rotten=rotten)
        asked.join(60)
        assert not asked.is_alive(), "drtool recover hangs after the kill"
        if target == "replica":
            time.sleep(self.rng.uniform(0.2, 0.8))  # degraded writes go on without the replica
        self.restart(target)
        self.stop_writer(killed_agent=target != "replica")
        self.crash["mode_after_restart"] = self.status()["mode"]
        if self.crash["mode_after_restart"] == "normal":
            self.crash["landed"] = "before recover took effect"
        self.run_cli("recover", "vol")  # idempotent: finishes what the kill interrupted
        self.start_writer()
        time.sleep(self.rng.uniform(0.2, 0.6))
        self.stop_writer(killed_agent=False)
        assert self.status()["mode"] == "degraded"
        self.settle()
        self.prove_replica(merged=True)

    def failback(self) -> None:
        self.phase = "failback"
        new = self.tmp / "new.img"
        if self.rng.random() < 0.5:
            with open(new, "wb") as handle:
                handle.truncate(self.size)  # a blank replacement
            kind = "blank"
        else:
            shutil.copyfile(self.device, new)  # the old disk, rotten regions and all
            kind = "stale copy"
        rate = self.rng.choice(["1M", "2M", "3M"])  # its pause: about a second or more
        env = {**os.environ, "DRTOOL_STATE_ROOT": str(self.state_root)}
        self.start_writer()
        proc = subprocess.Popen([*DRTOOL, "failback", "vol", "--device", str(new), "--rate", rate, "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            if self.rng.random() < 0.7:  # a random moment once the copy has begun
                deadline = time.monotonic() + 60
                while self.status()["mode"] != "resync" and proc.poll() is None:
                    assert time.monotonic() < deadline, "failback never started"
                    time.sleep(0.02)
                time.sleep(self.rng.uniform(0.0, 1.0))
            else:  # any moment from the command's start: its scrub of NEW included
                time.sleep(self.rng.uniform(0.0, 1.5))
            target = self.choose_target()
            finished = proc.poll() is not None
            self.kill(target, landed="after failback" if finished else "during failback", device=kind, rate=rate)
            if target == "replica":
                time.sleep(self.rng.uniform(0.2, 0.6))
            self.restart(target, command=proc)
            self.stop_writer(killed_agent=target != "replica")
            self.crash["failback_exit"] = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        self.crash["mode_after_restart"] = self.status()["mode"]
        if self.crash["mode_after_restart"] == "resync":
            self.crash["landed"] = "during failback (resync)"
        elif self.crash["mode_after_restart"] == "degraded":
            self.crash["landed"] = "before resync began (the failback's checks and scrub of NEW)"
        elif target == "replica" and self.crash["mode_after_restart"] == "normal":
            self.crash["landed"] = "during failback, which rode out the replica's restart"
        self.settle()
        # More writes in whatever mode the crash left (resync: into the overlay, marked to copy
        # back), and the failback is run again to its end while they go on (its finish races
        # them: tests/faults/test_failback_race.py); the writer stops after it, in normal mode.
        self.start_writer()
        time.sleep(self.rng.uniform(0.2, 0.6))
        self.trace.append(f"{time.time():.3f} FAILBACK again, writes going on")
        result = self.cli("failback", "vol", "--device", str(new), "--json")
        time.sleep(self.rng.uniform(0.0, 0.3))  # writes after the finish: onto the device
        self.stop_writer(killed_agent=False)
        assert result.code == 0, f"failback exited {result.code}: {result.err}"
        status = self.status()
        assert status["mode"] == "normal", (status["mode"], (status.get("recovery") or {}).get("reason"))
        assert status["device"] == str(new)
        assert status["maps"]["overlay"] == [] and status["maps"]["resync"] == [], status["maps"]
        info = status["failback"]
        assert info["done_regions"] == info["total_regions"], info
        self.settle()
        self.prove_replica(merged=False)
        self.prove_replica(merged=True)  # the overlay replica is gone: the merged view is the mirror

    def fresh_agent(self) -> None:
        self.phase = "end"
        assert self.agent.stop() == 0
        self.agent = self.start_agent("vol")
        actual = self.read_all()
        assert actual == bytes(self.model.durable), "a fresh agent serves other bytes"
        self.stats.checks["fresh_agent_compares"] += 1


@contextmanager
def seed_noted(run_ref: list, seed: int):
    try:
        yield
    except BaseException as exc:
        phase = run_ref[0].phase if run_ref else "setup"
        crash = getattr(run_ref[0], "crash", None) if run_ref else None
        exc.add_note(f"fault suite: seed {seed}, phase {phase}, last crash {crash}; replay with "
                     f"DRTOOL_FAULT_SEED={seed} DRTOOL_FAULT_ITERATIONS=1")
        print(f"FAILING SEED {seed} (phase {phase}, last crash {crash})")
        raise


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_kill9_during_writes_recover_and_failback(iteration, tmp_path, state_root, replica_server, protect_volume,
                                                  start_agent, cli, fault_stats):
    seed = BASE_SEED + iteration
    fault_stats.seeds.append(seed)
    print(f"seed {seed}")
    run_ref: list[Run] = []
    with seed_noted(run_ref, seed):
        rng = random.Random(seed * 7919)
        regions = rng.choice([48, 64, 80])
        path, data = protect_volume(regions * RS, seed=seed)
        assert cli("configure", "vol", "--fetch-timeout", "3").code == 0
        run = Run(seed, tmp_path, state_root, replica_server, start_agent, cli, fault_stats, path, data)
        run_ref.append(run)
        fault_stats.inputs["volumes"] += 1
        fault_stats.inputs["volume_bytes"] += len(data)
        run.normal()
        run.recover()
        run.failback()
        run.fresh_agent()
