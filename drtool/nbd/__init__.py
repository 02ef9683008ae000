"""NBD protocol server: serves anything that implements NbdExport.

This package knows nothing of drtool's volumes or engine; the agent hands it
exports.  ``FileExport`` serves a plain file or block device.
"""

from drtool.nbd.export import ExportFlags, NbdExport
from drtool.nbd.fileexport import FileExport
from drtool.nbd.server import NbdServer

__all__ = ["ExportFlags", "FileExport", "NbdExport", "NbdServer"]
