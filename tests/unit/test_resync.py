"""Resync planning and its rate limit."""

from __future__ import annotations

import asyncio
from array import array

from cargohold.core.layout import CHUNK_SIZE, copy_plan
from cargohold.services.copies import Budget


def _table(*gens: int) -> array[int]:
    return array("Q", gens)


def test_plan_copies_only_chunks_a_target_lacks_from_the_newest_source() -> None:
    size = 5 * CHUNK_SIZE
    sources = {"a": _table(3, 0, 7, 2, 0), "b": _table(3, 0, 9, 2, 0)}
    targets = {"t": _table(3, 0, 1, 0, 0), "u": _table(3, 0, 9, 2, 0)}
    assert copy_plan(size, sources, targets) == [(2, "b", 9, ["t"]), (3, "b", 2, ["t"])]


def test_plan_reads_from_every_source_that_holds_the_newest_generation() -> None:
    size = 4 * CHUNK_SIZE
    sources = {"a": _table(5, 5, 5, 5), "b": _table(5, 5, 5, 5)}
    plan = copy_plan(size, sources, {"t": _table()})
    assert [source for _, source, _, _ in plan] == ["a", "b", "a", "b"]


def test_plan_handles_short_tables_and_thin_chunks() -> None:
    size = 3 * CHUNK_SIZE  # a table may be shorter than the volume: missing chunks are 0
    assert copy_plan(size, {"a": _table(1)}, {"t": _table()}) == [(0, "a", 1, ["t"])]
    assert copy_plan(size, {"a": _table(0, 0, 0)}, {"t": _table(0)}) == []


def test_budget_sleeps_when_ahead_of_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        budget = Budget(100.0, clock=lambda: now[0], sleep=sleep)
        await budget.spend(50)  # 0.5 s worth at t=0
        now[0] = 1.0
        await budget.spend(50)  # 1.0 s worth at t=1: on time
        await Budget(0, sleep=sleep).spend(10**9)  # no limit

    asyncio.run(body())
    assert slept == [0.5]
