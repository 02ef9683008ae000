"""Which record sequence numbers a replica has applied: a watermark plus stragglers.

A record is applied iff its seq is at or below the watermark or in the set of
out-of-order seqs (forced batches ship one region's records ahead of older
records of other regions).  ``complete_through`` moves the watermark over
records the primary sent or deliberately dropped.
"""

from __future__ import annotations

import os

from drtool.replica.jsonstate import load_json, save_json


class AppliedState:
    def __init__(self, path: str, volume_id: str) -> None:
        self.path = path
        self.volume_id = volume_id
        self.watermark = 0
        self.ahead: set[int] = set()

    def create(self) -> None:
        self.save()

    def load(self) -> AppliedState:
        body = load_json(self.path, "applied-state", self.volume_id)
        self.watermark = int(body["watermark"])
        self.ahead = {int(s) for s in body["ahead"]}
        return self

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self) -> None:
        save_json(self.path, "applied-state", self.volume_id,
                  {"watermark": self.watermark, "ahead": sorted(self.ahead)})

    def has(self, seq: int) -> bool:
        return seq <= self.watermark or seq in self.ahead

    def mark(self, seqs: list[int]) -> None:
        self.ahead.update(seqs)
        self._advance()

    def complete_through(self, seq: int) -> None:
        if seq > self.watermark:
            self.watermark = seq
            self.ahead = {s for s in self.ahead if s > seq}
            self._advance()

    def _advance(self) -> None:
        while self.watermark + 1 in self.ahead:
            self.watermark += 1
            self.ahead.discard(self.watermark)
        self.ahead = {s for s in self.ahead if s > self.watermark}

    @property
    def highest(self) -> int:
        return max(self.ahead, default=self.watermark)
