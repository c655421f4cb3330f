"""What went wrong on a data server since it started: the counters its node exports."""

from __future__ import annotations

from cargohold.core.layout import BLOCK_SIZE


class Faults:
    """What went wrong on this data server since it started, for the node's metrics:
    failed requests (``io_errors``), blocks that failed their checksum (``checksum_errors``)
    and how many of those were written anew since (``repaired``: the engine or a scrub
    rewrites a bad copy from a good one)."""

    def __init__(self) -> None:
        self.io_errors = 0
        self.checksum_errors = 0
        self.repaired = 0
        self.bad: dict[str, set[int]] = {}  # volume id → offsets of blocks found bad

    def found(self, volume_id: str, offset: int) -> None:
        blocks = self.bad.setdefault(volume_id, set())
        block = offset - offset % BLOCK_SIZE
        if block not in blocks:  # the same bad block read again is no new error
            blocks.add(block)
            self.checksum_errors += 1

    def rewritten(self, volume_id: str, offset: int, length: int) -> None:
        blocks = self.bad.get(volume_id)
        if not blocks:
            return
        gone = {b for b in blocks if offset <= b and b + BLOCK_SIZE <= offset + length}
        if gone:
            blocks -= gone
            self.repaired += len(gone)
            if not blocks:
                del self.bad[volume_id]

    def to_dict(self) -> dict[str, int]:
        return {"io_errors": self.io_errors, "checksum_errors": self.checksum_errors,
                "repaired": self.repaired}
