"""The NBD face of an engine: what drtool.nbd serves for each volume.

The engine decides everything (normal or degraded, verification, redirection);
this adapter only translates calls.  Multi-conn is safe: every connection
shares the one engine, and FLUSH makes all acknowledged writes durable.
"""

from __future__ import annotations

from collections.abc import Sequence

from drtool import metrics
from drtool.engine import Engine
from drtool.nbd.export import Buffer, ExportFlags


class EngineExport:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name
        self.description = f"drtool volume {engine.name}"
        self.nbd_counts = metrics.of(engine).nbd  # what @metrics.counted adds to

    def size(self) -> int:
        return self.engine.size

    def flags(self) -> ExportFlags:
        return ExportFlags(read_only=self.engine.read_only_reason is not None, can_flush=True, can_fua=True,
                           can_trim=True, can_write_zeroes=True, can_multi_conn=True)

    @metrics.counted("read")
    def read(self, offset: int, length: int) -> Sequence[Buffer]:
        return [self.engine.read(offset, length)]

    @metrics.counted("write")
    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self.engine.write(offset, data, fua=fua)

    @metrics.counted("flush")
    def flush(self) -> None:
        self.engine.flush()

    @metrics.counted("trim")
    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.engine.trim(offset, length, fua=fua)

    @metrics.counted("write_zeroes")
    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.engine.write_zeroes(offset, length, fua=fua)
