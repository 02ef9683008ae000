"""The engine: one open volume serving merged, verified reads and logged, redirected writes.

core.py opens the volume, replays the log after a crash, checkpoints the maps and switches
modes; reads.py is the merged read path; writes.py the write path.  Callers import
:class:`Engine` from here.
"""

from drtool.engine.core import DEFAULT_SETTINGS, STRIPES, Engine

__all__ = ["DEFAULT_SETTINGS", "STRIPES", "Engine"]
