"""Backup schedules: the controller backs volumes up every so often and keeps the newest.

A schedule is a record in the metadata store (``backup/schedules/VOLUME``), so it outlives
the controller that ran it: whoever leads next reads when the last backup was started and
goes on from there. A turn is claimed with a compare-and-swap of ``last_started`` before the
backup starts (two controllers for a moment: one wins the swap), and a volume's backups
never run two at once anyway (``BackupService`` refuses a second). After a scheduled backup
is complete, the volume's backups beyond the ``keep`` newest are removed, and their blocks
collected.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from cargohold.core.models import BackupSchedule, BackupState
from cargohold.core.names import check_name
from cargohold.errors import BackupRunning, CargoholdError, InvalidArgument
from cargohold.services.backups import BackupService

log = logging.getLogger(__name__)

#: The shortest period a schedule takes.
MIN_EVERY = 60.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_every(text: str | float, least: float = MIN_EVERY) -> float:
    """A period: seconds, or a number with s, m, h or d (``30m``, ``1h``, ``7d``)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        found = re.fullmatch(r"(\d{1,7})([smhd]?)", str(text).strip())
        if found is None:
            raise InvalidArgument(what="--every", detail=f"{text!r}: give seconds or a number "
                                  "with s, m, h or d (30m, 1h, 7d)")
        seconds = float(int(found.group(1)) * _UNITS[found.group(2) or "s"])
    if not least <= seconds <= 366 * 86400:
        raise InvalidArgument(what="--every", detail=f"{seconds:g} s: between {least:g} s "
                              "and a year")
    return seconds


class BackupSchedules:
    def __init__(self, backups: BackupService, least: float = MIN_EVERY) -> None:
        self.backups = backups
        self.catalog = backups.catalog
        self.least = least  # the shortest period allowed (tests take seconds)

    async def set(self, volume: str, every: str | float, keep: int = 0) -> dict[str, Any]:
        check_name(volume)
        await self.catalog.volume(volume)  # it exists
        if not 0 <= keep <= 10_000:
            raise InvalidArgument(what="--keep", detail=f"{keep}: 0 (all) to 10000")
        schedule = BackupSchedule(volume=volume, every=parse_every(every, self.least),
                                  keep=keep)
        await self.backups.target()  # a target is set
        for old in await self.catalog.backup_schedules():
            if old.volume == volume:  # a new period counts from the last backup taken
                schedule.last_started, schedule.last_job = old.last_started, old.last_job
                schedule.retained = old.retained
        await self.catalog.put_backup_schedule(schedule)
        return schedule.model_dump(mode="json")

    async def remove(self, volume: str) -> bool:
        return await self.catalog.drop_backup_schedule(volume)

    async def listing(self) -> list[dict[str, Any]]:
        return [s.model_dump(mode="json") for s in await self.catalog.backup_schedules()]

    async def run_once(self, now: float | None = None) -> list[str]:
        """The controller's turn: start the backups that are due, apply retention after
        those that ended; return the jobs started."""
        now = time.time() if now is None else now
        started = []
        for schedule in await self.catalog.backup_schedules():
            if schedule.last_job and not schedule.retained:
                await self._retain(schedule)
            if now - schedule.last_started < schedule.every:
                continue
            if await self.catalog.find_volume(schedule.volume) is None:
                await self.catalog.drop_backup_schedule(schedule.volume)  # the volume went
                continue
            due = schedule.last_started

            def turn(s: BackupSchedule, due: float = due) -> BackupSchedule | None:
                if s.last_started != due:
                    return None  # another controller took this turn
                s.last_started = now
                return s

            if await self.catalog.update_backup_schedule(schedule.volume, turn) is None:
                continue
            try:
                job = await self.backups.create(schedule.volume)
            except BackupRunning:
                continue  # one runs already: this turn is it
            except CargoholdError as e:
                log.error("scheduled backup of %s not started: %s", schedule.volume, e)
                continue

            def remember(s: BackupSchedule, job_id: str = job.id) -> BackupSchedule:
                s.last_job, s.retained = job_id, False
                return s

            await self.catalog.update_backup_schedule(schedule.volume, remember)
            started.append(job.id)
            log.info("scheduled backup %s of %s started", job.id, schedule.volume)
        return started

    async def _retain(self, schedule: BackupSchedule) -> None:
        job = await self.catalog.backup_job(schedule.last_job)
        if job is not None and job.state is BackupState.RUNNING:
            return
        if job is not None and job.state is BackupState.COMPLETE and schedule.keep:
            try:
                await self._keep_newest(schedule.volume, schedule.keep)
            except CargoholdError as e:
                log.error("retention of %s's backups: %s (tried again)", schedule.volume, e)
                return

        def retained(s: BackupSchedule) -> BackupSchedule | None:
            if s.last_job != schedule.last_job:
                return None
            s.retained = True
            return s

        await self.catalog.update_backup_schedule(schedule.volume, retained)

    async def _keep_newest(self, volume: str, keep: int) -> None:
        complete = [b for b in await self.backups.listing(volume) if b["state"] == "complete"]
        doomed = complete[:-keep] if len(complete) > keep else []
        for backup in doomed:
            await self.backups.remove(backup["id"], collect=False)
        if doomed:
            log.info("retention of %s: %d backups removed, %d kept", volume, len(doomed), keep)
            await self.backups.collect()
