"""The loop around every background duty's ``run_once``.

Each duty (the controller's pass, the node's heartbeat, an engine's healer, a data server's
writeback) does one turn in ``run_once``, which tests call directly; :class:`Periodic` runs
those turns every ``interval`` seconds until told to stop. A turn that fails is logged and
the next one comes as usual (a bug must not end a duty for good), except for the errors
named in ``stop_on``, which end the loop (an engine that was fenced stops healing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cargohold.errors import CargoholdError

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, what: str, run_once: Callable[[], Awaitable[object]], interval: float,
                 *, wait_first: bool = False,
                 stop_on: tuple[type[BaseException], ...] = ()) -> None:
        """``wait_first``: the first turn comes after one interval (the caller ran one)."""
        self.what = what
        self.run_once = run_once
        self.interval = interval
        self.wait_first = wait_first
        self.stop_on = stop_on
        self.turns = 0

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        """Take turns until ``stop`` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        if self.wait_first and await self._stopped(stop):
            return
        while not stop.is_set():
            try:
                await self.run_once()
            except self.stop_on as e:
                log.warning("%s stops: %s", self.what, e)
                return
            except CargoholdError as e:
                log.error("%s failed: %s", self.what, e)
            except Exception:  # noqa: BLE001 - a bug must not end the duty for good
                log.exception("%s failed", self.what)
            self.turns += 1
            if await self._stopped(stop):
                return

    async def _stopped(self, stop: asyncio.Event) -> bool:
        """Wait one interval; whether ``stop`` was set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.interval)
        return stop.is_set()
