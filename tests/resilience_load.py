"""A bounded concurrent load generator for the resilience tests, and the numbers they report.

:class:`Load` runs one request function from a fixed number of workers until a request count
is reached, :meth:`Load.stop` is called, or a safety duration runs out, whichever comes first;
every request has its own timeout, so a hung request is recorded as a failure, never awaited
forever. The tests print one ``SCENARIO`` line each from the :class:`LoadResult`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Every wait in the resilience tests is bounded by this unless it says otherwise.
WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client saw of one request: success, the backend that served, and a detail."""

    ok: bool
    backend: str | None = None
    detail: str = ""


@dataclass
class LoadResult:
    """The outcomes of every request a load sent, in completion order."""

    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def succeeded(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    @property
    def failed(self) -> int:
        return self.sent - self.succeeded

    @property
    def failures(self) -> list[str]:
        """Details of the failed requests (at most 10, for an assertion message)."""
        return [o.detail for o in self.outcomes if not o.ok][:10]

    def served_by(self) -> Counter[str]:
        """Successful requests per backend name (the proxy's ``x-lb-backend`` header)."""
        return Counter(o.backend for o in self.outcomes if o.ok and o.backend is not None)

    def __add__(self, other: LoadResult) -> LoadResult:
        return LoadResult(self.outcomes + other.outcomes)


Send = Callable[[int], Awaitable[Outcome]]


class Load:
    """``concurrency`` workers calling ``send(i)`` for i = 0, 1, ... up to ``max_requests``.

    ``request_timeout_s`` bounds each request (a timeout is a failed outcome); ``max_duration_s``
    bounds the whole run. Exceptions from ``send`` are failed outcomes too.
    """

    def __init__(
        self,
        send: Send,
        *,
        concurrency: int,
        max_requests: int,
        max_duration_s: float = WAIT_S,
        request_timeout_s: float = 5.0,
    ) -> None:
        self._send = send
        self._concurrency = concurrency
        self._max_requests = max_requests
        self._max_duration_s = max_duration_s
        self._request_timeout_s = request_timeout_s
        self._next = 0
        self._stopping = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._progress = asyncio.Event()
        self.result = LoadResult()

    @property
    def done(self) -> int:
        """Requests finished so far."""
        return self.result.sent

    def start(self) -> Load:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]
        return self

    async def run(self) -> LoadResult:
        """Start, then wait until every request was sent and answered."""
        self.start()
        async with asyncio.timeout(self._max_duration_s + self._request_timeout_s + 1.0):
            await asyncio.gather(*self._workers)
        return self.result

    async def wait_done(self, count: int) -> None:
        """Wait until ``count`` requests have finished; fail after ``WAIT_S``."""
        async with asyncio.timeout(WAIT_S):
            while self.done < count:
                if all(w.done() for w in self._workers):
                    raise AssertionError(f"the load ended after {self.done} of {count} requests")
                self._progress.clear()
                await self._progress.wait()

    async def stop(self) -> LoadResult:
        """Let requests in flight finish, send no more, and return what the load saw."""
        self._stopping.set()
        async with asyncio.timeout(self._request_timeout_s + 1.0):
            await asyncio.gather(*self._workers)
        return self.result

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_duration_s
        while (
            not self._stopping.is_set()
            and self._next < self._max_requests
            and loop.time() < deadline
        ):
            index = self._next
            self._next += 1
            try:
                async with asyncio.timeout(self._request_timeout_s):
                    outcome = await self._send(index)
            except TimeoutError:
                outcome = Outcome(False, detail=f"request {index}: no answer in time (a hang)")
            except (aiohttp.ClientError, OSError) as exc:
                outcome = Outcome(False, detail=f"request {index}: {exc!r}")
            self.result.outcomes.append(outcome)
            self._progress.set()


def chat_body(max_tokens: int, *, stream: bool = False, content: str = "Hello!") -> dict[str, Any]:
    """An OpenAI chat completion request for the simulated servers."""
    return {
        "model": "sim-model",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def chat(session: aiohttp.ClientSession, base_url: str, max_tokens: int) -> Outcome:
    """One non-streamed chat completion; a success is a 200 with all ``max_tokens`` tokens."""
    async with session.post(f"{base_url}/v1/chat/completions", json=chat_body(max_tokens)) as resp:
        body = await resp.read()
        backend = resp.headers.get("x-lb-backend")
        if resp.status != 200:
            return Outcome(False, backend, f"status {resp.status}: {body[:200]!r}")
        usage = json.loads(body).get("usage", {})
        if usage.get("completion_tokens") != max_tokens:
            return Outcome(False, backend, f"incomplete answer: {body[:200]!r}")
        return Outcome(True, backend)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def scrape(admin_port: int) -> str:
    """The proxy's ``/metrics`` text."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` (e.g. ``lb_retries_total``) in Prometheus ``text``."""
    found: list[tuple[dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), float(sample.value)))
    return found


def exported(text: str, family: str) -> bool:
    """True if Prometheus ``text`` describes the metric ``family`` (a counter without
    ``_total``), even with no samples yet."""
    return any(f.name == family for f in text_string_to_metric_families(text))


def retries_in(metrics_text: str, pools: Iterable[Any] = ()) -> int | None:
    """Retries the proxy made: ``lb_retries_total`` summed over its labels when the metric
    exists, else the sum of ``pool.stats.retries`` over ``pools``; ``None`` if neither is known.
    """
    if exported(metrics_text, "lb_retries"):
        return int(sum(value for _, value in samples(metrics_text, "lb_retries_total")))
    pools = list(pools)
    if pools:
        return sum(sum(p.stats.retries.values()) for p in pools)
    return None


def summary(name: str, result: LoadResult, retried: int | None) -> str:
    """The line each scenario prints, so its numbers can be quoted."""
    shown = "unknown" if retried is None else str(retried)
    return (
        f"SCENARIO {name}: sent={result.sent} succeeded={result.succeeded} "
        f"failed={result.failed} retried={shown}"
    )


@dataclass(frozen=True, slots=True)
class RawResponse:
    """A response read off a raw socket: ``complete`` is False when the body was cut short
    (no last chunk, or fewer bytes than ``Content-Length``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool


async def send_raw(
    port: int, path: str, body: dict[str, Any]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection to 127.0.0.1:``port`` and write a whole JSON POST with
    ``Connection: close``; the caller reads the answer with :func:`read_raw`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (path.encode(), len(payload), payload)
    )
    await writer.drain()
    return reader, writer


async def read_raw(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float = WAIT_S
) -> RawResponse:
    """Read until the peer closes (``TimeoutError`` after ``timeout_s``) and parse the bytes.

    Reading raw bytes keeps whatever arrived before a cut, which an HTTP client may drop.
    """
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while piece := await reader.read(65536):
                data += piece
    finally:
        writer.close()
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    """Split one HTTP/1.1 response into status, headers and de-chunked body."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return RawResponse(0, {}, data, complete=False)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body, complete = rest[:length], len(rest) >= length
    else:
        body, complete = rest, True
    return RawResponse(status, headers, body, complete)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether its last chunk arrived."""
    out = b""
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return out, False
        size = int(data[pos:line_end].split(b";")[0], 16)
        if size == 0:
            return out, True
        start = line_end + 2
        out += data[start : start + size]
        if len(data) < start + size + 2:
            return out, False
        pos = start + size + 2
