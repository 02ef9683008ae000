"""StallWatch: notices connections whose reader is stuck in an export call.

One thread per server looks at the ``busy_since`` of the connections that
are executing a request, and asks a connection whose current call has
lasted STUCK_AFTER to hand its reader role to another thread (``promote``)
-- if the reader's thread is waiting (asleep in the kernel: network, disk,
a lock).  A thread that is running or runnable is computing, or was
preempted on a busy machine; another thread would not make it go faster.
On a loaded 2-core machine that check turned away nine false alarms in ten.

Looking costs the readers: every wake-up of this thread takes the GIL from
them (polling every millisecond cost ~40% more CPU per 4 KiB read).  So the
watch looks often only just after it found a stuck call (stalls come in
runs: a degraded volume fetches region after region), and backs off to
_SLOWEST_LOOK while calls keep finishing fast; a first stall after a quiet
spell is therefore noticed within STUCK_AFTER + _SLOWEST_LOOK.  When nobody
has been busy for _IDLE_AFTER it sleeps until a reader wakes it.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

#: an export call this long (seconds) gets the requests behind it another thread
STUCK_AFTER = 0.002
_FASTEST_LOOK = STUCK_AFTER / 2
_SLOWEST_LOOK = 0.016
_IDLE_AFTER = 0.1


class Watched(Protocol):
    #: perf_counter() when the reader began its current export call, else None
    busy_since: float | None
    #: threading.get_native_id() of the thread that holds the reader role
    reader_thread: int

    def promote(self, since: float) -> None: ...


class StallWatch:
    def __init__(self) -> None:
        self._watched: set[Watched] = set()
        self._changed = threading.Condition(threading.Lock())
        self._stopping = False
        #: read without the lock by readers on every request: see wake()
        self.asleep = False
        self._thread = threading.Thread(target=self._loop, name="nbd-stall-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join()

    def add(self, connection: Watched) -> None:
        with self._changed:
            self._watched.add(connection)

    def remove(self, connection: Watched) -> None:
        with self._changed:
            self._watched.discard(connection)

    def wake(self) -> None:
        """Called by a reader that set its busy_since and then saw ``asleep``."""
        with self._changed:
            self._changed.notify()

    def _loop(self) -> None:
        pause = _FASTEST_LOOK
        last_busy = time.perf_counter()
        while True:
            with self._changed:
                if time.perf_counter() - last_busy >= _IDLE_AFTER:
                    # Publish `asleep` first, then look: a reader that became busy
                    # before seeing it is found here; any later one calls wake().
                    self.asleep = True
                    if not self._stopping and not self._anyone_busy():
                        self._changed.wait()
                    self.asleep = False
                    pause = _FASTEST_LOOK
                else:
                    self._changed.wait(pause)
                if self._stopping:
                    return
                watched = list(self._watched)
            now = time.perf_counter()
            stuck = False
            for connection in watched:
                since = connection.busy_since
                if since is not None:
                    last_busy = now
                    if now - since >= STUCK_AFTER and _waiting(connection.reader_thread):
                        connection.promote(since)
                        stuck = True
            pause = _FASTEST_LOOK if stuck else min(2 * pause, _SLOWEST_LOOK)

    def _anyone_busy(self) -> bool:
        return any(connection.busy_since is not None for connection in self._watched)


def _waiting(native_id: int) -> bool:
    """Is the thread asleep in the kernel (Linux /proc state S or D)?  Unknown counts as yes."""
    try:
        with open(f"/proc/self/task/{native_id}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split(None, 1)[0]
    except (OSError, IndexError):
        return True
    return state in (b"S", b"D")
