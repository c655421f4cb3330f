"""Retrying what failed for a passing reason: one backoff, one notion of "temporary".

An error is temporary when its class in the error tree says so (``CargoholdError.temporary``:
a data server, a node or the metadata store is unreachable, a compare-and-swap lost a race,
a volume is busy with another operation). Everything else fails at once: retrying a refused
request unchanged cannot help. A caller with a narrower idea (only its own compare-and-swap
conflicts, only SQLite's "database is locked") passes its own ``temporary``.

:func:`retry` and :func:`retry_blocking` run a call until it succeeds, fails for good, or
its :class:`Backoff` runs out; loops with more to do between attempts (etcd's failover
across endpoints) take pauses from :meth:`Backoff.start` themselves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cargohold.errors import CargoholdError

T = TypeVar("T")
Clock = Callable[[], float]
Temporary = Callable[[BaseException], bool]

log = logging.getLogger(__name__)


def is_temporary(error: BaseException) -> bool:
    """Whether the error tree marks ``error`` as worth another try."""
    return isinstance(error, CargoholdError) and error.temporary


@dataclass(frozen=True)
class Backoff:
    """Pauses that grow from ``first`` by ``factor`` up to ``most``, for at most ``attempts``
    tries or ``timeout`` seconds (None: no limit)."""

    first: float = 0.05
    most: float = 1.0
    factor: float = 2.0
    attempts: int | None = None
    timeout: float | None = None

    def start(self, clock: Clock = time.monotonic) -> Attempts:
        """Begin one run: the clock for ``timeout`` starts now."""
        return Attempts(self, clock)


class Attempts:
    """One run of a :class:`Backoff`: hands out the pause before each new try."""

    def __init__(self, backoff: Backoff, clock: Clock) -> None:
        self.backoff = backoff
        self._clock = clock
        self._deadline = math.inf if backoff.timeout is None else clock() + backoff.timeout
        self._pause = backoff.first
        self.tries = 1  # the first try needs no pause

    def remaining(self) -> float:
        """Seconds left before the timeout (infinite without one)."""
        return self._deadline - self._clock()

    def next_pause(self) -> float | None:
        """The pause before the next try, or None when the attempts or the time ran out."""
        limit = self.backoff.attempts
        remaining = self.remaining()
        if (limit is not None and self.tries >= limit) or remaining <= 0:
            return None
        pause = min(self._pause, remaining)
        self._pause = min(self._pause * self.backoff.factor, self.backoff.most)
        self.tries += 1
        return pause


async def retry(call: Callable[[], Awaitable[T]], backoff: Backoff, *, what: str,
                temporary: Temporary = is_temporary, quiet: bool = False) -> T:
    """Await ``call()`` until it succeeds; a temporary failure is tried again after a pause,
    any other failure (or the last one) is raised. The first retry of ``what`` is logged as
    a warning unless ``quiet`` (failures that are routine, such as a lost compare-and-swap)."""
    attempts = backoff.start()
    while True:
        try:
            return await call()
        except Exception as e:
            pause = attempts.next_pause() if temporary(e) else None
            if pause is None:
                raise
            level = logging.WARNING if attempts.tries == 2 and not quiet else logging.DEBUG
            log.log(level, "%s failed (try %d), again in %.2f s: %s", what, attempts.tries - 1,
                    pause, e)
        await asyncio.sleep(pause)


def retry_blocking(call: Callable[[], T], backoff: Backoff, *, temporary: Temporary) -> T:
    """:func:`retry` for a thread that may block (SQLite's calls run in one); quiet, since
    its callers retry many short waits (a busy database) as a matter of course."""
    attempts = backoff.start()
    while True:
        try:
            return call()
        except Exception as e:
            pause = attempts.next_pause() if temporary(e) else None
            if pause is None:
                raise
        time.sleep(pause)
