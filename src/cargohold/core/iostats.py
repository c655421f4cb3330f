"""Counts and latency histograms of requests, kept cheaply where they are served.

An engine keeps one :class:`OpStats` per kind of I/O (read, write, flush, trim) and writes
them to its stats file; the node keeps one per metadata store operation. The node turns them
into Prometheus metrics (``adapters/metrics.py``). Counts only grow, from the start of the
process that keeps them (Prometheus counters reset with the process, which it handles).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

#: Upper bounds (seconds) of the latency buckets; one more bucket holds everything above.
#: From a page-cache hit of a local replica (~50 µs) to a replica that times out.
LATENCY_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OpStats:
    """Requests of one kind: how many, their bytes, failures, and their latencies."""

    __slots__ = ("ops", "bytes", "errors", "seconds", "buckets")

    def __init__(self) -> None:
        self.ops = 0
        self.bytes = 0
        self.errors = 0
        self.seconds = 0.0  # sum of the latencies
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)  # not cumulative; the last: above all

    def done(self, size: int, seconds: float) -> None:
        """One request of ``size`` bytes answered after ``seconds``."""
        self.ops += 1
        self.bytes += size
        self.seconds += seconds
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def failed(self, seconds: float) -> None:
        """One request that failed after ``seconds`` (counted in the latencies too)."""
        self.errors += 1
        self.done(0, seconds)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, requests at or below it) per bucket, the last bound +inf."""
        out, total = [], 0
        for bound, count in zip((*LATENCY_BOUNDS, float("inf")), self.buckets, strict=True):
            total += count
            out.append((bound, total))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "seconds": self.seconds, "buckets": list(self.buckets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpStats:
        """Read what ``to_dict`` wrote; ValueError when it is not that."""
        stats = cls()
        try:
            stats.ops, stats.bytes = int(data["ops"]), int(data["bytes"])
            stats.errors, stats.seconds = int(data["errors"]), float(data["seconds"])
            buckets = [int(b) for b in data["buckets"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"not request statistics: {e}") from None
        if len(buckets) != len(stats.buckets):
            raise ValueError(f"{len(buckets)} latency buckets, expected {len(stats.buckets)}")
        stats.buckets = buckets
        return stats


class VolumeIo:
    """An engine's requests from the kernel, by kind (``at``: when counted, epoch seconds)."""

    KINDS = ("read", "write", "flush", "trim")
    __slots__ = (*KINDS, "at")

    def __init__(self, at: float = 0.0) -> None:
        self.at = at
        self.read = OpStats()
        self.write = OpStats()
        self.flush = OpStats()
        self.trim = OpStats()

    def to_dict(self) -> dict[str, Any]:
        return {kind: getattr(self, kind).to_dict() for kind in self.KINDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], at: float = 0.0) -> VolumeIo:
        io = cls(at)
        for kind in cls.KINDS:
            if kind in data:
                setattr(io, kind, OpStats.from_dict(data[kind]))
        return io


#: What ``IoRates`` gives per volume, per second.
RATES = ("read_iops", "write_iops", "read_bytes", "write_bytes")


class IoRates:
    """Per-second rates of each volume's reads and writes, from successive counts."""

    def __init__(self) -> None:
        self._last: dict[str, VolumeIo] = {}
        self.rates: dict[str, dict[str, float]] = {}

    def update(self, counts: dict[str, VolumeIo]) -> dict[str, dict[str, float]]:
        """Take the latest counts (volume → counts); return the rates of every volume in
        them: over the last two different counts, 0 for one counted only once."""
        rates = {}
        for name, now in counts.items():
            before = self._last.get(name)
            if before is None or now.at < before.at or now.read.ops < before.read.ops:
                rates[name] = dict.fromkeys(RATES, 0.0)  # new, or a new engine
            elif now.at == before.at:
                rates[name] = self.rates.get(name, dict.fromkeys(RATES, 0.0))
                continue  # not counted again since: keep the rate and the older counts
            else:
                seconds = now.at - before.at
                rates[name] = {
                    "read_iops": (now.read.ops - before.read.ops) / seconds,
                    "write_iops": (now.write.ops - before.write.ops) / seconds,
                    "read_bytes": (now.read.bytes - before.read.bytes) / seconds,
                    "write_bytes": (now.write.bytes - before.write.bytes) / seconds}
            self._last[name] = now
        self._last = {name: io for name, io in self._last.items() if name in counts}
        self.rates = rates
        return rates
