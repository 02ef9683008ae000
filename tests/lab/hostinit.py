"""PID 1 of one lab host: make the host's private view of the machine, then reap orphans forever.

Started by lab.py as
``nsenter --net=/run/netns/<host> unshare --mount --uts --pid --fork --mount-proc -- python hostinit.py SPEC``
where SPEC is a JSON object (see ``main``). It lives as long as the host does: sshd may be killed and
restarted (lab.cut/restore) without losing the host's mounts, because the mount namespace is held
by this process, not by sshd. Killing it with SIGKILL from the root namespace ends the whole pid
namespace, which is how the lab tears a host down.

Only the standard library: this runs with whatever Python the lab was started from.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys

MS_BIND = 0x1000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    # ctypes rather than mount(8): no fork per mount, and errors carry errno.
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def _detach(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _mount_points_under(top: str) -> list[str]:
    """Mount points at or below ``top``, shallowest first (detaching one takes its subtree)."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].encode().decode("unicode_escape")  # octal escapes: \040
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return sorted(set(found), key=len)


class PrivateTree:
    """Mounts host-private tmpfs directories without creating anything on the shared root filesystem.

    A missing mount point cannot simply be mkdir'ed: that would leave a directory on the machine's
    real filesystem (and rmdir'ing it later would detach the mount in every other lab that uses
    it). Instead the nearest existing ancestor gets an overlay whose upper layer lives in a
    scratch tmpfs private to this host, so the new directory exists only in this host's view.
    """

    def __init__(self, scratch: str) -> None:
        self.scratch = scratch
        self.owned: list[str] = []  # trees whose contents belong to this host only
        _mount("drlab-scratch", scratch, "tmpfs", 0, "mode=0700,size=16m")

    def _owns(self, path: str) -> bool:
        return any(path == top or path.startswith(top.rstrip("/") + "/") for top in self.owned)

    def ensure_dir(self, path: str) -> None:
        if os.path.isdir(path):
            return
        ancestor = path
        while not os.path.isdir(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not self._owns(ancestor):
            layer = os.path.join(self.scratch, "overlay" + ancestor.replace("/", "_"))
            os.makedirs(f"{layer}/upper")
            os.makedirs(f"{layer}/work")
            _mount("drlab-overlay", ancestor, "overlay", 0,
                   f"lowerdir={ancestor},upperdir={layer}/upper,workdir={layer}/work")
            self.owned.append(ancestor)
        os.makedirs(path, exist_ok=True)

    def tmpfs(self, path: str, mode: str) -> None:
        self.ensure_dir(path)
        _mount(f"drlab-{os.path.basename(path) or 'root'}", path, "tmpfs", 0, f"mode={mode}")
        self.owned.append(path)


def setup(spec: dict) -> None:
    socket.sethostname(spec["hostname"])
    os.chdir("/")

    # The root namespace's /run/netns bind mounts were copied into this mount namespace; holding
    # them would keep other labs' network namespaces alive after they `ip netns del` them.
    for target in _mount_points_under("/run/netns"):
        try:
            _detach(target)
        except OSError:  # already gone with its parent
            pass

    # sysfs is tagged with the network namespace it was mounted in; remount it so /sys/class/net
    # shows this host's interfaces (what `ip netns exec` does too).
    try:
        _detach("/sys")
        _mount("sysfs", "/sys", "sysfs")
    except OSError as error:
        print(f"hostinit: keeping the shared /sys: {error}", file=sys.stderr)

    tree = PrivateTree(spec["scratch"])
    # Shallow paths first so a nested path lands inside its parent's tmpfs, not under an overlay.
    for path, mode in sorted(spec["private"].items(), key=lambda item: item[0].count("/")):
        tree.tmpfs(path, mode)
    if "/run" in spec["private"]:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        os.makedirs("/run/lock", exist_ok=True)
        os.chmod("/run/lock", 0o1777)
    for target, source in spec.get("bind_files", {}).items():
        _mount(source, target, None, MS_BIND)


def reap_forever() -> None:
    # As PID 1 of the pid namespace we inherit every orphan (sshd session children, daemons that
    # double-fork); without reaping they would pile up as zombies.
    signals = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    while True:
        received = signal.sigwait(signals)
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if received != signal.SIGCHLD:
            sys.exit(0)


def main() -> None:
    """SPEC keys: hostname, scratch (dir for private scratch tmpfs), private ({path: mode}),
    bind_files ({target: source} files bind-mounted over existing files), ready (file written
    when set up)."""
    spec = json.loads(sys.argv[1])
    try:
        setup(spec)
    except Exception as error:  # the lab reads this file instead of waiting for its timeout
        with open(spec["ready"] + ".failed", "w") as handle:
            handle.write(f"{type(error).__name__}: {error}\n")
        raise
    with open(spec["ready"] + ".tmp", "w") as handle:
        handle.write("ok\n")
    os.rename(spec["ready"] + ".tmp", spec["ready"])
    reap_forever()


if __name__ == "__main__":
    main()
