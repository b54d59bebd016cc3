"""Background loops run by the web process when `RUN_BACKGROUND_WORKERS` is true (the
default), so one `uvicorn app.main:app` is a complete deployment. Each loop survives errors
(logged) and is cancelled at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger()


async def every(name: str, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run `job` now and then every `seconds`, logging (not raising) its failures under its
    `name` (the jobs fail alike when the database is down: the line says which one it is)."""
    while True:
        try:
            await job()
        except Exception as exc:
            log.warning("worker.job_failed", job=name, error_type=type(exc).__name__)
        await asyncio.sleep(seconds)


class BackgroundWorkers:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def start(self, name: str, loop: Coroutine[Any, Any, Any]) -> None:
        self._tasks[name] = asyncio.create_task(loop, name=name)

    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        """Start `job` as the loop `name`, run every `seconds` (`every`)."""
        self.start(name, every(name, seconds, job))

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
