"""Simulated OpenAI-compatible model server (vLLM-like): the server, its endpoints and the CLI.

Run ``python -m backends.sim --port 8001 --port 8002`` (or ``--ports 8001-8003``): one process,
one :class:`~backends.engine.Engine` per port, each instance named ``sim-<port>``. Tests use
:func:`start_sim` to run instances in-process on ephemeral ports.

Model endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` and
``stream_options.include_usage`` supported; token ``i`` is the text ``"tok<i> "``; every
response finishes with ``"length"`` after ``max_tokens``, default 16), ``GET /v1/models``.
Request parsing and response shapes live in :mod:`backends.openai_api`. vLLM's tokenizer
endpoints, ``POST /tokenize`` and ``POST /v1/chat/completions/render`` (and
``/v1/completions/render``), answer with the simulation's own token ids
(:mod:`backends.tokenize_routes`), for routers that match prefixes on token ids.
The ``model`` field is optional and any value is accepted; responses name the served model.

Each instance simulates vLLM's automatic prefix caching (:mod:`backends.prefix_cache`): a
prompt's cached prefix costs no prefill time, and ``/metrics`` reports the hits.

Operations (:mod:`backends.sim_ops`): ``GET /health``, ``GET /metrics`` (vLLM's metric names),
``GET /sim/stats``, ``GET|POST /sim/faults``, ``GET|POST /sim/engine``, ``POST /sim/reset``.
Test helpers (:mod:`backends.testing_routes`): ``/echo``, ``/stream``, ``/sleep``,
``/status/{code}``.
Faults (:mod:`backends.faults`: ``hang``, ``error_rate``) apply to the model endpoints and the
test helpers, never to the operations endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiohttp import web

from backends import sim_ops, testing_routes, tokenize_routes
from backends.engine import Engine, EngineConfig
from backends.faults import ChunkSender, Faults, StreamDropped
from backends.openai_api import (
    CompletionShape,
    openai_error,
    parse_completion_request,
    read_json,
    sse,
)
from backends.sim_flags import parse_args, start_knobs
from backends.sim_ops import OPS_HOST
from backends.testing_routes import HELPER_HOST

__all__ = ["Faults", "SimServer", "main", "parse_args", "serve", "start_sim"]

# Request bodies are read whole for the model endpoints only; /echo streams its body.
MAX_BODY_BYTES = 64 * 1024 * 1024
FAULTABLE_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", *(r.path for r in testing_routes.ROUTES)}
)


def token_text(index: int) -> str:
    """The deterministic text of output token ``index``."""
    return f"tok{index} "


class SimServer:
    """One simulated model server: an engine, its fault knobs and its HTTP listener.

    Create with :func:`start_sim`. ``port`` and ``url`` are the bound ones; ``name`` defaults
    to ``sim-<port>``. ``engine.config`` and ``faults`` may be changed at any time; setting
    ``faults.refuse`` makes the listener follow it in the background, :meth:`set_refuse`
    returns once it has.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str | None = None,
        model: str = "sim-model",
        seed: int | None = None,
        config: EngineConfig | None = None,
        faults: Faults | None = None,
        shutdown_timeout_s: float = 0.5,
    ):
        self.host = host
        self.model = model
        self.engine = Engine(config)
        self.faults = faults if faults is not None else Faults()
        self.requests_by_path: Counter[str] = Counter()
        self.errors_injected = 0
        self.streams_dropped = 0
        self.created = int(time.time())
        self._port = port
        self._name = name
        self._rng = random.Random(seed)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._listener_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def name(self) -> str:
        return self._name or f"sim-{self._port}"

    @property
    def listening(self) -> bool:
        """Whether the listening socket is open (false while refusing or once closed)."""
        return self._site is not None

    @property
    def stats(self) -> dict[str, Any]:
        """Counters and gauges, as served by ``GET /sim/stats``."""
        e = self.engine
        return {
            "name": self.name,
            "listening": self.listening,
            "requests_total": sum(self.requests_by_path.values()),
            "requests_by_path": dict(self.requests_by_path),
            "running": e.running,
            "waiting": e.waiting,
            "completed": e.completed_total,
            "aborted": e.aborted_total,
            "max_running_seen": e.max_running_seen,
            "errors_injected": self.errors_injected,
            "streams_dropped": self.streams_dropped,
            "prompt_tokens_total": e.prompt_tokens_total,
            "generation_tokens_total": e.generation_tokens_total,
            "kv_cache_usage": e.kv_cache_usage,
            "prefix_cache_query_tokens": e.prefix_cache_queries_total,
            "prefix_cache_hit_tokens": e.prefix_cache_hits_total,
            "prefix_cache_blocks": len(e.prefix_cache),
            "prefix_cache_capacity_blocks": e.prefix_cache.capacity_blocks,
            "last_prefill_ms": e.last_prefill_ms,
            "prefill_ms_total": e.prefill_ms_total,
            "faults": self.faults.as_dict(),
            "engine": dataclasses.asdict(e.config),
        }

    async def start(self) -> None:
        """Bind the listener (on ``port``, or an ephemeral one for 0) and start serving."""
        app = web.Application(middlewares=[_count_and_fault], client_max_size=MAX_BODY_BYTES)
        app[SIM] = self
        app[OPS_HOST] = self  # the same server, as sim_ops sees it
        app[HELPER_HOST] = self  # and as testing_routes sees it
        app.on_response_prepare.append(_tag_instance)
        app.router.add_routes(ROUTES)
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away cancels its handler
            access_log=None,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await self._runner.setup()
        await self._open_listener()  # even when refusing: an ephemeral port must be fixed first
        self.faults.on_refuse_change = self._follow_refuse
        await self._sync_listener()

    async def close(self) -> None:
        """Stop listening; in-flight requests get ``shutdown_timeout_s`` before cancellation."""
        self.faults.on_refuse_change = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def set_refuse(self, refuse: bool, *, for_s: float | None = None) -> None:
        """Close (``True``) or re-open the listener; with ``for_s``, re-open by itself later."""
        self.faults.refuse = refuse
        await self._sync_listener()
        if refuse and for_s is not None:
            self._spawn(self._reopen_after(for_s))

    async def inject_faults(self) -> web.Response | None:
        """Hold the request while hanging; then maybe answer with the configured error."""
        await self.faults.wait_while_hung()
        f = self.faults
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            self.errors_injected += 1
            return openai_error(f.error_status, f"simulated failure ({self.name})")
        return None

    def reset_counters(self) -> None:
        """Zero the request and fault counters and the engine's (not its prefix cache)."""
        self.engine.reset_counters()
        self.requests_by_path.clear()
        self.errors_injected = self.streams_dropped = 0

    def abort_stream(self, request: web.Request) -> None:
        """Cut ``request``'s connection at once (the drop fault) and count it."""
        self.streams_dropped += 1
        if request.transport is not None:
            request.transport.abort()  # closed at once, no terminating chunk: a cut stream

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _follow_refuse(self) -> None:
        self._spawn(self._sync_listener())

    async def _reopen_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.set_refuse(False)

    async def _open_listener(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        self._site = site
        self._port = site.port  # re-opening after a refuse binds the same port

    async def _sync_listener(self) -> None:
        async with self._listener_lock:
            if self._runner is None:
                return
            if not self.faults.refuse and self._site is None:
                await self._open_listener()
            elif self.faults.refuse and self._site is not None:
                site, self._site = self._site, None
                await site.stop()
                # Like a server going away: open connections close once their current
                # response is done, so pooled keep-alive connections stop working too.
                server = self._runner.server
                for conn in server.connections if server is not None else []:
                    conn.close()


SIM = web.AppKey("sim", SimServer)


@web.middleware
async def _count_and_fault(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    sim = request.app[SIM]
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else "<unmatched>"
    sim.requests_by_path[path] += 1
    try:
        if path in FAULTABLE_PATHS:
            injected = await sim.inject_faults()
            if injected is not None:
                return injected
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return openai_error(exc.status, exc.reason)


async def _tag_instance(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-sim-instance"] = request.app[SIM].name


async def _completion(request: web.Request, *, chat: bool) -> web.StreamResponse:
    sim = request.app[SIM]
    try:
        req = parse_completion_request(await read_json(request), chat=chat)
    except ValueError as exc:
        return openai_error(400, str(exc))
    shape = CompletionShape(req, sim.model)
    if not req.stream:
        async with sim.engine.admit(req.tokens) as seq:
            text = "".join([token_text(await seq.next_token()) for _ in range(req.max_tokens)])
            seq.finish()
        return web.json_response(shape.full(text, req.max_tokens))

    # Headers go out at once, as with vLLM: a queued request already has its 200.
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    sender = ChunkSender(resp, sim.faults)
    try:
        async with sim.engine.admit(req.tokens) as seq:
            for _ in range(req.max_tokens):
                index = await seq.next_token()
                await sender.send(sse(shape.chunk(token_text(index), first=index == 0)))
            await sender.send(sse(shape.chunk(None)))
            if req.include_usage:
                await sender.send(sse(shape.usage_chunk(req.max_tokens)))
            await sender.send(b"data: [DONE]\n\n")
            seq.finish()
        await resp.write_eof()
    except StreamDropped:
        sim.abort_stream(request)
    except ConnectionResetError:
        pass  # the client went away mid-stream; the engine counted the sequence as aborted
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


async def models(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    card = {
        "id": sim.model,
        "object": "model",
        "created": sim.created,
        "owned_by": "vllm",
        "root": sim.model,
        "parent": None,
    }
    return web.json_response({"object": "list", "data": [card]})


ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.get("/v1/models", models),
    *tokenize_routes.ROUTES,
    *sim_ops.ROUTES,
    *testing_routes.ROUTES,
]


async def start_sim(
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    name: str | None = None,
    model: str = "sim-model",
    seed: int | None = None,
    **knobs: Any,
) -> SimServer:
    """Start a simulated server on ``host:port`` (0 = ephemeral) and return it, serving.

    ``knobs`` are :class:`~backends.engine.EngineConfig` and :class:`Faults` fields by name
    (``max_batch=2, decode_ms=1, error_rate=0.5``); a bad one raises ``ValueError``.
    ``seed`` seeds the fault dice; ``name`` defaults to ``sim-<port>``.
    """
    engine_names = {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(**{k: v for k, v in knobs.items() if k in engine_names})
    faults = Faults()
    faults.update({k: v for k, v in knobs.items() if k not in engine_names})
    sim = SimServer(
        host=host, port=port, name=name, model=model, seed=seed, config=config, faults=faults
    )
    await sim.start()
    return sim


async def serve(args: argparse.Namespace) -> None:
    """Run one instance per port until SIGTERM or SIGINT, printing a readiness line for each."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    knobs = start_knobs(args)
    sims: list[SimServer] = []
    try:
        for i, port in enumerate(args.ports):
            seed = None if args.seed is None else args.seed + i
            sim = await start_sim(
                port, args.host, name=args.name, model=args.model, seed=seed, **knobs
            )
            sims.append(sim)
            if args.refuse:
                await sim.set_refuse(True)
            print(f"{sim.name} listening on {sim.url}", flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(sim.close() for sim in sims))


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional: the stdlib loop works, only slower
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: serve until signalled; exit status 0, or 1 if a port cannot be bound."""
    args = parse_args(argv)
    try:
        _run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"backends.sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
