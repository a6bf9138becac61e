"""What the periodic probers (health checks, load reports) share: their HTTP session and the
lifetime of their per-backend tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiohttp


def probe_session(timeout_s: float, headers: dict[str, str]) -> aiohttp.ClientSession:
    """A session for probing backends: one keep-alive connection per backend, reused from
    probe to probe (a probe per interval should not cost a handshake each time), no cap on
    the total (``limit=0``) so a large pool's probes never queue behind each other, no
    cookies, bodies left compressed."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=1, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers=headers,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


class ProbeTasks:
    """The tasks of one prober, and the session they share."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        """Cancel and await every task, then close the session; idempotent."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        session, self.session = self.session, None
        if session is not None:
            await session.close()
