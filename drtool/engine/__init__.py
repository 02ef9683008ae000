"""The engine: one open volume serving merged, verified reads and logged, redirected writes,
and the only code that changes a volume's state.

core.py opens the volume, replays the log after a crash, checkpoints the maps and makes the
mode, role and pairing changes; modes.py is the mode machine; changes.py the commit routine
(and the locking rule); reads.py the merged read path; writes.py the write path; lag.py the
lag summary.  The engine satisfies the typed interfaces of drtool/ports.py that its helpers
(fetch, replication, failback, roles) get.  Callers import :class:`Engine` from here.
"""

from drtool.engine.core import DEFAULT_SETTINGS, STRIPES, Engine

__all__ = ["DEFAULT_SETTINGS", "STRIPES", "Engine"]
