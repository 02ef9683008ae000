"""`make demo`: a whole incident on one machine, told as a story.

A primary volume holding an ext4 filesystem is protected by a secondary on
127.0.0.1.  Then its disk lies: some regions are silently corrupted and a span
starts returning I/O errors (a real EIO, from a FUSE file served by nbdkit's
ddrescue filter).  drtool detects it, keeps serving exact data through its NBD
agent, takes writes during the incident, and fails back by copying only what
was lost or changed.  Everything lives under .demo/ and is removed at the end
(keep it with DRTOOL_DEMO_KEEP=1).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
DRTOOL = [sys.executable, "-m", "drtool"]
SIZE_MIB = 256
RS = 64 * 1024
console = Console(width=min(Console().width, 100))
processes: list[subprocess.Popen] = []
mounts: list[Path] = []


def say(title: str, text: str = "") -> None:
    console.print()
    console.print(Rule(f"[bold cyan]{title}"))
    if text:
        console.print(text)


def run(*argv: str, check: bool = True, show: bool = True, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    if show:
        console.print(f"[dim]$ {' '.join(str(a) for a in argv)}[/dim]")
    env = {**os.environ, "DRTOOL_STATE_ROOT": str(WORK / "state"), "COLUMNS": str(console.width)}
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, **kw)
    if not quiet:
        output = (done.stdout + done.stderr).rstrip()
        if output:
            console.print(output, markup=False, highlight=False)
    if check and done.returncode != 0:
        raise SystemExit(f"demo step failed ({done.returncode}): {' '.join(map(str, argv))}")
    return done


def drtool(*argv: str, **kw) -> subprocess.CompletedProcess:
    if kw.pop("show", True):
        console.print(f"[dim]$ drtool {' '.join(argv)}[/dim]")
    return run(*DRTOOL, *argv, show=False, **kw)


def b3(path: Path) -> str:
    return subprocess.run(["b3sum", "--no-names", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def start(argv: list[str], ready: str, log: Path, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env={**os.environ, "DRTOOL_STATE_ROOT": str(WORK / "state"), **(env or {})})
    processes.append(proc)
    seen = ""
    deadline = time.monotonic() + 30
    while ready not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{argv[0]} exited early; see {log}")
        seen += line
    return proc, seen


def fuse_device(mount: Path, image: Path, mapfile: Path | None = None) -> Path:
    """Serve ``image`` as a real file through nbdfuse; with a ddrescue map, its '-' spans return EIO."""
    mount.mkdir(parents=True, exist_ok=True)
    nbdkit = ["nbdkit", "-s", "--exit-with-parent"]
    nbdkit += ["--filter=ddrescue", "file", str(image), f"ddrescue-mapfile={mapfile}"] if mapfile else \
        ["file", str(image)]
    proc = subprocess.Popen(["nbdfuse", str(mount / "disk"), "--command", *nbdkit],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(proc)
    mounts.append(mount)
    deadline = time.monotonic() + 15
    while not (mount / "disk").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("nbdfuse did not come up (is /dev/fuse available?)")
        time.sleep(0.05)
    return mount / "disk"


def unmount(mount: Path) -> None:
    subprocess.run(["umount", str(mount)], capture_output=True)
    if mount in mounts:
        mounts.remove(mount)


def cleanup() -> None:
    for mount in list(mounts):
        unmount(mount)
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not os.environ.get("DRTOOL_DEMO_KEEP"):
        shutil.rmtree(WORK, ignore_errors=True)


def build_filesystem(image: Path) -> None:
    with open(image, "wb") as handle:
        handle.truncate(SIZE_MIB << 20)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "payroll", image)
    files = WORK / "files"
    files.mkdir()
    commands = ["mkdir /ledgers"]
    for index in range(24):
        path = files / f"ledger-{index:02d}.dat"
        path.write_bytes(os.urandom((1 + index % 5) << 20))
        commands.append(f"write {path} /ledgers/{path.name}")
    (WORK / "debugfs.cmd").write_text("\n".join(commands) + "\n")
    run("debugfs", "-w", "-f", WORK / "debugfs.cmd", image, quiet=True)


def main() -> int:
    for tool in ("mkfs.ext4", "debugfs", "e2fsck", "nbdkit", "nbdfuse", "nbdcopy", "b3sum", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"the demo needs {tool}: run `make demo` as root (it installs the packages)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    clock = time.monotonic()
    try:
        story(clock)
    finally:
        cleanup()
    console.print(Panel(f"demo finished in {time.monotonic() - clock:.1f}s; everything under .demo/ is gone",
                        style="green"))
    return 0


def story(clock: float) -> None:
    image = WORK / "disk.img"
    say("1. A primary volume with a filesystem",
        f"A {SIZE_MIB} MiB ext4 filesystem of ledgers, written without mounting (mkfs.ext4 + debugfs). "
        "The primary sees its disk through a file (here a FUSE file, so it can fail for real later).")
    build_filesystem(image)
    original = WORK / "original.img"
    shutil.copyfile(image, original)
    mount = WORK / "dev"
    device = fuse_device(mount, image)
    drtool("init", "payroll", "--device", str(device), "--region-size", "64K")

    say("2. A secondary site, and replication",
        "The secondary runs drtool's replica server; the primary pairs with it and ships every region.")
    token = WORK / "token"
    token.write_text(os.urandom(24).hex() + "\n")
    token.chmod(0o600)
    _, line = start([*DRTOOL, "serve", "--root", WORK / "secondary", "--listen", "127.0.0.1:0",
                     "--token-file", token], "listening on", WORK / "serve.log")
    peer = "http://" + re.search(r"listening on (\S+)", line).group(1)
    drtool("protect", "payroll", "--peer", peer, "--token-file", str(token))
    drtool("status", "payroll")

    say("3. The disk lies",
        "Eight regions are silently overwritten with garbage, and a 1 MiB span starts failing with EIO.")
    unmount(mount)
    with open(image, "r+b") as handle:
        for region in (17, 90, 411, 1024, 1555, 2048, 3000, 4000):
            handle.seek(region * RS + 1234)
            handle.write(os.urandom(512))
    span = (600 * RS, 16 * RS)
    (WORK / "ddrescue.map").write_text(
        "# Rescue Logfile\n0x00000000 +\n"
        f"0x00000000 0x{span[0]:08x} +\n0x{span[0]:08x} 0x{span[1]:08x} -\n"
        f"0x{span[0] + span[1]:08x} 0x{(SIZE_MIB << 20) - span[0] - span[1]:08x} +\n")
    device = fuse_device(mount, image, WORK / "ddrescue.map")
    console.print(f"[dim]$ dd if={device} bs=64K skip=600 count=1[/dim]")
    dd = subprocess.run(["dd", f"if={device}", "of=/dev/null", "bs=64K", "skip=600", "count=1"],
                        capture_output=True, text=True)
    console.print(dd.stderr.strip().splitlines()[0] if dd.stderr else "")

    say("4. Detect", "A scrub reads every region and checks it against its blake3 digest.")
    drtool("scrub", "payroll", check=False)
    drtool("status", "payroll")

    say("5. Recover: serve correct data at once",
        "Writes go to an overlay from now on; bad regions are fetched from the secondary on demand, "
        "verified end to end. The agent exports the merged volume over NBD.")
    drtool("recover", "payroll")
    sock = WORK / "payroll.sock"
    start([*DRTOOL, "agent", "payroll", "--nbd-socket", sock, "--listen", "none"], "payroll:",
          WORK / "agent.log")
    uri = f"nbd+unix:///payroll?socket={sock}"
    copy = WORK / "read-back.img"
    run("nbdcopy", uri, copy)
    console.print(f"blake3 of what was written: [bold]{b3(original)[:32]}…[/bold]")
    console.print(f"blake3 read through drtool: [bold]{b3(copy)[:32]}…[/bold]")
    if b3(original) != b3(copy):
        raise SystemExit("the merged read differs from what was written")
    console.print("[green]identical: every byte was served verified[/green]")
    run("e2fsck", "-fn", copy)
    drtool("status", "payroll")

    say("6. Write during the incident",
        "A new file goes into the filesystem through the agent (debugfs on an nbdfuse view of the export). "
        "The bytes land in the overlay and are replicated to the secondary's overlay replica.")
    live = WORK / "live"
    live.mkdir()
    fuse = subprocess.Popen(["nbdfuse", str(live / "disk"), uri], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    processes.append(fuse)
    mounts.append(live)
    deadline = time.monotonic() + 15
    while not (live / "disk").exists():
        if fuse.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nbdfuse could not show the export as a file (is /dev/fuse there?)")
        time.sleep(0.05)
    note = WORK / "incident-note.txt"
    note.write_text("written while the disk was failing; kept in the overlay, replicated, failed back\n" * 200)
    run("debugfs", "-w", "-R", f"write {note} /INCIDENT.txt", live / "disk", quiet=True)
    unmount(live)
    drtool("replicate", "payroll", "--wait")
    drtool("status", "payroll")

    say("7. Repair and fail back",
        "The disk is replaced by a repaired one (the raw image: still holding the garbage, but readable). "
        "Failback verifies it, then copies only the bad regions and the overlay.")
    final = WORK / "final.img"
    run("nbdcopy", uri, final, show=False)
    unmount(mount)
    drtool("failback", "payroll", "--device", str(image), "--rate", "500M")
    drtool("status", "payroll")
    console.print(f"blake3 of the volume through the agent before failback: [bold]{b3(final)[:32]}…[/bold]")
    console.print(f"blake3 of the repaired device after failback:         [bold]{b3(image)[:32]}…[/bold]")
    if b3(final) != b3(image):
        raise SystemExit("the failed-back device differs from the volume")
    run("e2fsck", "-fn", image)
    shown = run("debugfs", "-R", "cat /INCIDENT.txt", image, quiet=True)
    if "written while the disk was failing" not in shown.stdout:
        raise SystemExit("the incident's write is missing after failback")
    console.print("[green]the device holds the incident's write, the filesystem is clean, the volume is "
                  "ONLINE again[/green]")


if __name__ == "__main__":
    sys.exit(main())
