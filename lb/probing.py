"""What the periodic probers (health checks, load reports) share: their HTTP session and the
lifetime of their per-backend tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from lb.backend import Backend


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

    def start(
        self,
        kind: str,
        pool_name: str,
        backends: Sequence[Backend],
        run: Callable[[Backend], Coroutine[Any, Any, None]],
        open_session: Callable[[], aiohttp.ClientSession] | None,
    ) -> None:
        """One task per backend, named ``kind:pool:backend``, sharing the session
        ``open_session`` makes (if any)."""
        asyncio.get_running_loop()  # raises RuntimeError outside a loop, before any side effect
        self.session = open_session() if open_session is not None else None
        for backend in backends:
            self.spawn(run(backend), f"{kind}:{pool_name}:{backend.name}")

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


def describe_failure(exc: Exception, timeout_s: float) -> str:
    """A short reason for a failed probe or scrape, for logs and the admin API."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeout errors subclass it too
        return f"timeout after {timeout_s:g}s"
    cause: BaseException = exc
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ConnectionResetError | aiohttp.ServerDisconnectedError):
        return "connection reset"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
