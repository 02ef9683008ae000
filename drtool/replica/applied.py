"""Which record sequence numbers a replica has applied: a watermark plus stragglers.

A record is applied iff its seq is at or below the watermark or in the set of
out-of-order seqs (forced batches ship one region's records ahead of older
records of other regions).  ``complete_through`` moves the watermark over
records the primary sent or deliberately dropped.

The same file keeps what the records said about their sender: the highest era
seen, when the last batch was applied and how many records were applied.  It is
saved with every checkpoint anyway, so this costs no extra write.

For the mirror, with a journal, the file is the checkpoint's commit:
``journal_at`` is the journal position before which the mirror's image and
digests hold every record; records after it are durable in the journal only
and are replayed into the mirror when it is opened (drtool.replica.volume).
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
        self.max_era = 0
        self.last_record_at: float | None = None
        self.records = 0  # applied since this state was created (rebase uses it to see "untouched")
        self.journal_at: tuple[int, int] | None = None  # the mirror's checkpoint in its journal

    def create(self, watermark: int = 0) -> None:
        self.watermark = watermark
        self.save()

    def load(self) -> AppliedState:
        body = load_json(self.path, "applied-state", self.volume_id)
        self.watermark = int(body["watermark"])
        self.ahead = {int(s) for s in body["ahead"]}
        # Absent in files written before these were tracked.
        self.max_era = int(body.get("max_era", 0))
        self.last_record_at = body.get("last_record_at")
        self.records = int(body.get("records", 0))
        at = body.get("journal_at")
        self.journal_at = (int(at[0]), int(at[1])) if at else None
        return self

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self) -> None:
        save_json(self.path, "applied-state", self.volume_id,
                  {"watermark": self.watermark, "ahead": sorted(self.ahead), "max_era": self.max_era,
                   "last_record_at": self.last_record_at, "records": self.records,
                   **({"journal_at": list(self.journal_at)} if self.journal_at is not None else {})})

    def has(self, seq: int) -> bool:
        return seq <= self.watermark or seq in self.ahead

    def mark(self, seqs: list[int]) -> None:
        self.ahead.update(seqs)
        self._advance()

    def note_batch(self, count: int, max_era: int, when: float) -> None:
        """``count`` records were applied at ``when``, the newest era among them ``max_era``."""
        self.records += count
        self.max_era = max(self.max_era, max_era)
        self.last_record_at = when

    def absorb_facts(self, other: AppliedState) -> None:
        """Keep what ``other``'s records said about the primary (its era, its last batch time)."""
        self.max_era = max(self.max_era, other.max_era)
        self.last_record_at = latest(self, other)

    def complete_through(self, seq: int) -> None:
        if seq > self.watermark:
            self.watermark = seq
            self.ahead = {s for s in self.ahead if s > seq}
            self._advance()

    def rebase(self, seq: int) -> None:
        """A new sequence space starts after ``seq`` (a new primary): forget the old one."""
        self.watermark = seq
        self.ahead = set()

    def absorb(self, other: AppliedState) -> None:
        """Take over ``other``'s applied seqs and sender facts (the overlay merged into the mirror).

        The primary's mirror and overlay records share one sequence space and its
        ``complete_through`` vouches for both, so the union is what was applied.
        """
        self.watermark, self.ahead = combined_watermark(self, other)
        self.records += other.records
        self.absorb_facts(other)
        self.last_record_at = latest(self, other)

    def _advance(self) -> None:
        while self.watermark + 1 in self.ahead:
            self.watermark += 1
            self.ahead.discard(self.watermark)
        self.ahead = {s for s in self.ahead if s > self.watermark}

    @property
    def highest(self) -> int:
        return max(self.ahead, default=self.watermark)


def combined_watermark(first: AppliedState, second: AppliedState) -> tuple[int, set[int]]:
    """Watermark and stragglers of the union of two applied states of one sequence space."""
    watermark = max(first.watermark, second.watermark)
    ahead = {s for s in first.ahead | second.ahead if s > watermark}
    while watermark + 1 in ahead:
        watermark += 1
        ahead.discard(watermark)
    return watermark, ahead


def latest(*states: AppliedState) -> float | None:
    """The last time any of ``states`` applied a batch, or None."""
    return max((s.last_record_at for s in states if s.last_record_at is not None), default=None)
