from __future__ import annotations

import asyncio

import pytest

from cargohold.core.periodic import Periodic
from cargohold.core.retry import Backoff, is_temporary, retry, retry_blocking
from cargohold.errors import (
    ConcurrentUpdate,
    DataServerUnavailable,
    Fenced,
    InvalidArgument,
    MetadataUnavailable,
    VolumeNotFound,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pauses_grow_to_the_most_and_stop_after_the_attempts() -> None:
    attempts = Backoff(first=0.1, most=0.3, attempts=5).start()
    assert [attempts.next_pause() for _ in range(5)] == [0.1, 0.2, 0.3, 0.3, None]


def test_pauses_stop_at_the_timeout_and_never_pass_it() -> None:
    clock = Clock()
    attempts = Backoff(first=1.0, most=10.0, timeout=2.5).start(clock)
    assert attempts.next_pause() == 1.0
    clock.now += 1.0
    assert attempts.next_pause() == 1.5  # 2.0 would pass the deadline
    clock.now += 1.5
    assert attempts.remaining() == 0 and attempts.next_pause() is None


def test_the_error_tree_says_what_is_temporary() -> None:
    assert is_temporary(MetadataUnavailable(url="u", detail="d"))
    assert is_temporary(DataServerUnavailable(server="s", address="a", detail="d"))
    assert is_temporary(ConcurrentUpdate(what="w"))
    assert not is_temporary(VolumeNotFound(name="v"))
    assert not is_temporary(Fenced(volume_id="v", epoch=1, current=2))
    assert not is_temporary(OSError("disk"))


def test_retry_tries_temporary_failures_again_until_one_succeeds() -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MetadataUnavailable(url="u", detail="down")
        return "done"

    assert asyncio.run(retry(flaky, Backoff(first=0.001, attempts=5), what="t")) == "done"
    assert len(calls) == 3


def test_retry_raises_other_failures_at_once_and_the_last_when_out_of_attempts() -> None:
    calls = []

    async def refused() -> None:
        calls.append(1)
        raise InvalidArgument(what="x", detail="y")

    with pytest.raises(InvalidArgument):
        asyncio.run(retry(refused, Backoff(first=0.001, attempts=5), what="t"))
    assert len(calls) == 1

    async def down() -> None:
        calls.append(1)
        raise MetadataUnavailable(url="u", detail=f"try {len(calls)}")

    calls.clear()
    with pytest.raises(MetadataUnavailable, match="try 3"):
        asyncio.run(retry(down, Backoff(first=0.001, attempts=3), what="t"))


def test_retry_blocking_takes_its_own_idea_of_temporary() -> None:
    calls = []

    def busy() -> int:
        calls.append(1)
        if len(calls) < 4:
            raise OSError("locked")
        return 7

    assert retry_blocking(busy, Backoff(first=0.0, attempts=4),
                          temporary=lambda e: "locked" in str(e)) == 7
    with pytest.raises(OSError, match="locked"):
        calls.clear()
        retry_blocking(busy, Backoff(first=0.0, attempts=2), temporary=lambda e: True)


def test_periodic_survives_failures_and_stops_when_told() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        stop = asyncio.Event()

        async def turn() -> None:
            seen.append("turn")
            if len(seen) == 1:
                raise MetadataUnavailable(url="u", detail="down")
            if len(seen) == 2:
                raise ValueError("a bug")  # logged; the duty goes on
            if len(seen) == 4:
                stop.set()

        await asyncio.wait_for(Periodic("test", turn, 0.001).run_forever(stop), 5)
        return seen

    assert asyncio.run(scenario()) == ["turn"] * 4


def test_periodic_ends_on_the_errors_it_is_told_to_stop_on() -> None:
    async def scenario() -> int:
        runner = Periodic("test", fenced, 0.001, stop_on=(Fenced,))
        await asyncio.wait_for(runner.run_forever(), 5)
        return runner.turns

    async def fenced() -> None:
        raise Fenced(volume_id="v", epoch=1, current=2)

    assert asyncio.run(scenario()) == 0


def test_periodic_can_wait_one_interval_first() -> None:
    async def scenario() -> int:
        turns = []
        stop = asyncio.Event()

        async def turn() -> None:
            turns.append(1)

        task = asyncio.ensure_future(
            Periodic("test", turn, 10.0, wait_first=True).run_forever(stop))
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)
        return len(turns)

    assert asyncio.run(scenario()) == 0
