"""Traffic mirroring: a copy of a share of a route's requests goes to a shadow pool.

The client only ever gets the primary's answer. The copy is sent by its own task, after the
request body is complete, through its own HTTP client: its answer is read and dropped, its
latency and errors are counted under the shadow pool's name, and a slow or dead shadow can
neither delay nor fail the primary. Bodies larger than the replay limit are not mirrored.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Final

import aiohttp

from lb.forwarding import HOP_BY_HOP_REQUEST
from lb.load import Attempt
from lb.pool import Pool
from lb.request import IncomingRequest
from lb.router import Route
from lb.strategies import RequestInfo
from lb.tls import aiohttp_tls

log = logging.getLogger("lb.mirror")

MIRROR_TIMEOUT_S: Final = 600.0
MAX_MIRRORS_IN_FLIGHT: Final = 256


class Mirrors:
    """Sends mirrored copies and keeps them bounded."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Copies not sent, by shadow pool: too many in flight, body too large or incomplete.
        self.skipped: dict[str, int] = {}

    def maybe_mirror(self, route: Route, req: IncomingRequest, info: RequestInfo) -> None:
        shadow = route.mirror
        if shadow is None or self._rng.random() >= route.mirror_share:
            return
        if len(self._tasks) >= MAX_MIRRORS_IN_FLIGHT or not req.body.replayable:
            self._skip(shadow)
            return
        task = asyncio.get_running_loop().create_task(self._send(shadow, req, info))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _skip(self, pool: Pool) -> None:
        self.skipped[pool.name] = self.skipped.get(pool.name, 0) + 1

    async def _send(self, pool: Pool, req: IncomingRequest, info: RequestInfo) -> None:
        body = req.body
        # The copy waits for the body without taking it: the primary forwards it meanwhile.
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT_S):
                await body.completed()
        except TimeoutError:
            pass
        if not body.complete or not body.replayable:
            self._skip(pool)
            return
        data = body.held()
        candidates = pool.candidates(())
        if not candidates:
            pool.stats.responses_by_class[0] += 1
            return
        backend = candidates[0] if len(candidates) == 1 else pool.strategy.pick(candidates, info)
        headers = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in req.headers
            if n.lower() not in HOP_BY_HOP_REQUEST
        ]
        url = backend.origin + req.url.decode("latin-1")
        started = time.monotonic()
        status = 0
        with Attempt(backend, decay_s=pool.rtt_decay_s) as attempt:
            try:
                session = self._client()
                async with session.request(
                    req.method.decode(), url, headers=headers, data=data, **aiohttp_tls(backend)
                ) as resp:
                    attempt.response_started(resp.status)
                    status = resp.status
                    async for _ in resp.content.iter_any():
                        pass
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("mirror to pool=%s backend=%s failed: %s", pool.name, backend.name, exc)
                attempt.finish(failed=True)
        stats = pool.stats
        stats.responses_by_class[min(status // 100, 5)] += 1
        stats.duration.observe(time.monotonic() - started)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=MIRROR_TIMEOUT_S),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
