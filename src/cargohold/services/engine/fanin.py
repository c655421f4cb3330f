"""Completion of a request fanned out to every replica (the engine's write fast path)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Settling(Protocol):
    """What a fan-in needs of the replica set (``ReplicaSet``)."""

    @property
    def members(self) -> Sequence[Any]: ...

    def _landed(self, counted: range | None) -> None: ...

    def _marking(self) -> bool: ...

    async def _settle(self, members: list[Any], results: Sequence[object], what: str) -> None: ...


class FanIn:
    """Completes ``done`` once every replica answered one fanned-out request.

    All OK (and no replica being marked out of sync meanwhile): ``done`` resolves from the
    last response callback. Otherwise the results go through ``ReplicaSet._settle`` in a task,
    which records failed replicas before ``done`` completes.
    """

    __slots__ = ("_replicas", "_done", "_members", "_replies", "_what", "_left", "_counted")

    def __init__(self, replicas: Settling, done: asyncio.Future[None], members: list[Any],
                 replies: list[asyncio.Future[bytes | memoryview]], what: str,
                 counted: range | None) -> None:
        self._replicas = replicas
        self._done = done
        self._members = members
        self._replies = replies
        self._what = what
        self._left = len(replies)
        self._counted = counted
        for reply in replies:
            reply.add_done_callback(self._answered)

    def _answered(self, _reply: asyncio.Future[bytes | memoryview]) -> None:
        self._left -= 1
        if self._left:
            return
        done, replicas = self._done, self._replicas
        replicas._landed(self._counted)
        if done.cancelled():
            return
        if (all(not r.cancelled() and r.exception() is None for r in self._replies)
                and replicas.members and not replicas._marking()):
            done.set_result(None)
            return
        results = [r.exception() if not r.cancelled() else asyncio.CancelledError()
                   for r in self._replies]
        chain(asyncio.ensure_future(replicas._settle(self._members, results, self._what)), done)


def chain(source: asyncio.Future[T], target: asyncio.Future[T]) -> None:
    """Complete ``target`` like ``source`` once it is done."""

    def copy(_: asyncio.Future[T]) -> None:
        if target.done():
            return
        if source.cancelled():
            target.cancel()
        elif (error := source.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(source.result())

    source.add_done_callback(copy)
