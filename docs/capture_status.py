"""Capture `drtool status` in four states, from real runs, for docs/status.md.

    python docs/capture_status.py [--dir /tmp/drtool-captures] [--groups] > captures.md

One volume `vol-a` (4 MiB, 64 regions of 64 KiB) paired with a local replica server
(`drtool serve` on 127.0.0.1), taken through: healthy (protected, in sync); lagging (5
writes not shipped, no agent running to ship them); lagging with the replica server
down; degraded (2 regions corrupted, found by a scrub, then `drtool recover`); faulted
(the device file deleted after the failback).  Each state is shown as a terminal of 80
columns shows it (a pseudo-terminal of that width, colours stripped) and piped
(`| cat`: plain text), the single-volume panel and the list view.  Everything runs the
installed `drtool` through its CLI; nothing is mocked.  The output is Markdown.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

DRTOOL = [sys.executable, "-m", "drtool"]
RS = 64 * 1024
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Capture:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = {**os.environ, "DRTOOL_STATE_ROOT": str(base / "state")}
        self.env.pop("COLUMNS", None)
        self.server: subprocess.Popen | None = None
        self.port = 0

    def drtool(self, *argv: str, check: bool = True) -> str:
        proc = subprocess.run([*DRTOOL, *argv], env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode not in (0, 3):
            raise SystemExit(f"drtool {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def on_terminal(self, *argv: str, columns: int = 80) -> str:
        """What ``drtool ARGV`` shows on a terminal ``columns`` wide (colours stripped)."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
        proc = subprocess.Popen([*DRTOOL, *argv], env={**self.env, "TERM": "xterm"}, stdin=slave,
                                stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=120)
        os.close(master)
        text = ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")
        return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")

    def start_server(self) -> None:
        listen = f"127.0.0.1:{self.port}"
        self.server = subprocess.Popen([*DRTOOL, "serve", "--root", str(self.base / "replicas"), "--listen", listen],
                                       env=self.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.server.stdout.readline()
        found = re.search(r"listening on [\d.]+:(\d+)", line)
        if not found:
            raise SystemExit(f"the replica server did not start: {line!r}")
        self.port = int(found.group(1))

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=60)
            self.server.stdout.close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def show(self, title: str) -> str:
        parts = [f"### {title}", ""]
        for argv, label in ((["status", "vol-a"], "drtool status vol-a"), (["status"], "drtool status")):
            parts += ["At 80 columns:", "", "```", f"$ {label}", self.on_terminal(*argv), "```", "",
                      "Piped:", "", "```", f"$ {label} | cat", self.drtool(*argv).rstrip("\n"), "```", ""]
        return "\n".join(parts)


def show_group(cap: Capture, title: str) -> str:
    parts = [f"### {title}", ""]
    for argv, label in ((["group", "status", "db"], "drtool group status db"),):
        parts += ["At 80 columns:", "", "```", f"$ {label}", cap.on_terminal(*argv), "```", "",
                  "Piped:", "", "```", f"$ {label} | cat", cap.drtool(*argv).rstrip("\n"), "```", ""]
    return "\n".join(parts)


def groups(base: Path) -> str:
    """A consistency group ``db`` of ``data`` and ``wal`` (4 MiB each): in sync; lagging (writes
    on wal not shipped); not consistent (data's log overflowed into bitmap mode)."""
    cap = Capture(base)
    out = []
    try:
        cap.start_server()
        for name in ("data", "wal"):
            device = base / f"{name}.img"
            device.write_bytes(bytes(range(256)) * (4 * 1024 * 1024 // 256))
            cap.drtool("init", name, "--device", str(device), "--region-size", "64K")
        cap.drtool("group", "create", "db", "data", "wal")
        cap.drtool("protect", "db", "--peer", cap.url)
        out.append(show_group(cap, "A group in sync"))
        for region in range(3, 6):
            subprocess.run([*DRTOOL, "write", "wal", "--offset", str(region * RS)], input=b"w" * 84,
                           env=cap.env, check=True, capture_output=True)
        out.append(show_group(cap, "Lagging: 3 writes on wal not yet shipped, no agent to ship them"))
        cap.drtool("replicate", "db", "--wait")
        cap.drtool("configure", "data", "--log-limit", "1M")
        for region in range(20, 40):
            subprocess.run([*DRTOOL, "write", "data", "--offset", str(region * RS)], input=b"d" * 65000,
                           env=cap.env, check=True, capture_output=True)
        out.append(show_group(cap, "Not consistent: data's log overflowed (bitmap mode)"))
    finally:
        cap.stop_server()
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/drtool-captures", help="scratch directory (emptied first)")
    parser.add_argument("--groups", action="store_true", help="capture `drtool group status` of a consistency "
                        "group instead (docs/status.md, Consistency groups)")
    args = parser.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    if args.groups:
        sys.stdout.write(groups(base))
        return 0
    device = base / "dev.img"
    device.write_bytes(bytes(range(256)) * (4 * 1024 * 1024 // 256))
    cap = Capture(base)
    out = []
    try:
        cap.start_server()
        cap.drtool("init", "vol-a", "--device", str(device), "--region-size", "64K")
        cap.drtool("protect", "vol-a", "--peer", cap.url)
        out.append(cap.show("Healthy: protected, in sync"))

        for region in range(3, 8):
            subprocess.run([*DRTOOL, "write", "vol-a", "--offset", str(region * RS)], input=b"x" * 84,
                           env=cap.env, check=True, capture_output=True)
        out.append(cap.show("Lagging: 5 writes not yet shipped, the replica server up, no agent to ship them"))

        cap.stop_server()
        out.append(cap.show("Lagging with the replica server down: not protected at all"))

        cap.start_server()
        cap.drtool("replicate", "vol-a", "--wait")
        with open(device, "r+b") as handle:
            for region in (20, 21):
                handle.seek(region * RS + 100)
                handle.write(b"rot")
        cap.drtool("scrub", "vol-a")
        cap.drtool("recover", "vol-a")
        out.append(cap.show("Degraded: 2 corrupted regions found by a scrub, then `drtool recover`"))

        cap.drtool("failback", "vol-a")
        device.unlink()
        out.append(cap.show("Faulted: the device file was deleted after the failback (no scrub since)"))
    finally:
        cap.stop_server()
    sys.stdout.write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
