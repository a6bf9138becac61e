"""Continuous-batching simulation of one model server: a FIFO queue, a bounded batch, timed tokens.

Also renders the engine's numbers as Prometheus text under vLLM's metric names.

The model is the one vLLM exposes to a load balancer, not a faithful copy of its scheduler:

* At most ``max_batch`` sequences run at once; the rest wait in a FIFO queue and are admitted
  one by one as running sequences end (finished or aborted).
* A sequence's first token arrives after the prefill time
  ``(ttft_ms + (prompt_tokens - cached_tokens) * prefill_ms_per_token) / speed``, where
  ``cached_tokens`` is the prompt's prefix found in the prefix cache
  (:mod:`backends.prefix_cache`) when the sequence was admitted to the batch, which is when vLLM's
  scheduler looks it up. A prompt given only as a token count is never cached.
* Each later token takes ``decode_ms * (1 + batch_slowdown * (running - 1)) / speed``, with
  ``running`` read afresh at every step, so a fuller batch decodes every sequence more slowly
  (vLLM's per-step time grows with the batch it steps).
* KV-cache usage is ``sum(prompt + generated tokens over running sequences) / kv_capacity_tokens``,
  clamped to 1; waiting sequences hold no cache. The prefix cache is a pool of its own, of
  ``cache_capacity_blocks`` blocks of ``block_size`` tokens (default: as many blocks as
  ``kv_capacity_tokens`` holds); 0 blocks disables it.

Each sequence is driven by its own request task sleeping once per token: no step loop, no busy
wait. A sequence holds its batch slot inside ``async with engine.admit(...)`` and gives it back on
exit whichever way the block ends, so a client that goes away (the handler is cancelled or a
write fails) frees the slot at once and is counted as aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from backends.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache, Tokens

Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class EngineConfig:
    """Timing and capacity knobs; every field may be changed at runtime through the engine.

    Defaults: ``max_batch=8``, ``ttft_ms=20``, ``prefill_ms_per_token=0.05``, ``decode_ms=10``,
    ``batch_slowdown=0.05``, ``speed=1.0`` (0.5 takes twice as long), ``kv_capacity_tokens=65536``,
    ``block_size=16``, ``cache_capacity_blocks=None`` (``kv_capacity_tokens // block_size``; 0
    disables prefix caching).
    """

    max_batch: int = 8
    ttft_ms: float = 20.0
    prefill_ms_per_token: float = 0.05
    decode_ms: float = 10.0
    batch_slowdown: float = 0.05
    speed: float = 1.0
    kv_capacity_tokens: int = 65536
    block_size: int = DEFAULT_BLOCK_SIZE
    cache_capacity_blocks: int | None = None

    def cache_capacity(self) -> int:
        """The prefix cache's capacity in blocks, with the default worked out."""
        if self.cache_capacity_blocks is not None:
            return self.cache_capacity_blocks
        return self.kv_capacity_tokens // self.block_size

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first knob of the wrong type or out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is None and value is None:
                continue  # an optional knob (an int) left to its worked-out default
            kinds = (int,) if isinstance(f.default, int | None) else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{f.name} must be a number ({kinds[-1].__name__})")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.kv_capacity_tokens < 1:
            raise ValueError("kv_capacity_tokens must be at least 1")
        if self.block_size < 1:
            raise ValueError("block_size must be at least 1")
        if self.cache_capacity_blocks is not None and self.cache_capacity_blocks < 0:
            raise ValueError("cache_capacity_blocks must not be negative")
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        for name in ("ttft_ms", "prefill_ms_per_token", "decode_ms", "batch_slowdown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class Engine:
    """The batch, the queue and the counters of one simulated model server.

    ``sleep`` is injected (default ``asyncio.sleep``) so the timing can be driven by a test.
    Counters only grow, except through :meth:`reset_counters`. ``prefix_cache`` is replaced by
    an empty one when ``block_size`` changes (block hashes depend on it) and resized when its
    capacity does.
    """

    def __init__(self, config: EngineConfig | None = None, *, sleep: Sleep = asyncio.sleep):
        self.config = config if config is not None else EngineConfig()
        self.config.validate()
        self._sleep = sleep
        self._running: set[Sequence] = set()
        # FIFO of sequences waiting for a slot; a waiter is removed when it is admitted or when
        # its task is cancelled, so len() is the honest waiting count.
        self._waiters: deque[tuple[Sequence, asyncio.Future[None]]] = deque()
        self._kv_tokens = 0  # prompt + generated tokens held by running sequences
        self.prefix_cache = PrefixCache(self.config.block_size, self.config.cache_capacity())
        # In tokens, as vLLM V1 counts them: every prompt token of a lookup, and those cached.
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0
        self.last_prefill_ms = 0.0  # time to first token of the latest prefill done
        self.prefill_ms_total = 0.0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.completed_total = 0
        self.aborted_total = 0
        self.max_running_seen = 0

    @property
    def running(self) -> int:
        """Sequences holding a batch slot."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch slot."""
        return len(self._waiters)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache held by running sequences, in 0..1."""
        return min(1.0, self._kv_tokens / self.config.kv_capacity_tokens)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache over prompt tokens looked up, in 0..1."""
        queries = self.prefix_cache_queries_total
        return self.prefix_cache_hits_total / queries if queries else 0.0

    def admit(self, prompt: int | Tokens) -> Sequence:
        """A sequence to enter with ``async with``: waits for a batch slot, holds it until exit.

        ``prompt`` is the tokenised prompt, or only its length, which the prefix cache ignores.
        """
        return Sequence(self, prompt)

    def reconfigure(self, **changes: Any) -> None:
        """Change config knobs by name; raise ``ValueError`` (config unchanged) if one is bad."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown engine knob(s): {', '.join(unknown)}")
        candidate = dataclasses.replace(self.config, **changes)
        candidate.validate()
        for name, value in changes.items():
            setattr(self.config, name, value)
        c = self.config
        if c.block_size != self.prefix_cache.block_size:
            self.prefix_cache = PrefixCache(c.block_size, c.cache_capacity())
        else:
            self.prefix_cache.resize(c.cache_capacity())
        self._admit_waiters()  # a larger max_batch frees slots now

    def reset_counters(self) -> None:
        """Zero the cumulative counters (not the sequences, nor the prefix cache's blocks)."""
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0
        self.last_prefill_ms = 0.0
        self.prefill_ms_total = 0.0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.completed_total = 0
        self.aborted_total = 0
        self.max_running_seen = self.running

    def decode_step_s(self) -> float:
        """Time for the next token of every running sequence, given the batch as it is now."""
        c = self.config
        slowdown = 1.0 + c.batch_slowdown * max(self.running - 1, 0)
        return c.decode_ms * slowdown / c.speed / 1000.0

    def prefill_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Time to first token of ``prompt_tokens``, of which ``cached_tokens`` need no prefill."""
        c = self.config
        computed = prompt_tokens - cached_tokens
        return (c.ttft_ms + computed * c.prefill_ms_per_token) / c.speed / 1000.0

    async def _acquire(self, seq: Sequence) -> None:
        if not self._waiters and self.running < self.config.max_batch:
            self._start(seq)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Race: the slot was handed over just before the cancellation landed.
                self._release(seq, completed=False)
            else:
                self._waiters.remove(entry)
                self.aborted_total += 1
            raise

    def _start(self, seq: Sequence) -> None:
        self._running.add(seq)
        self._kv_tokens += seq.prompt_tokens
        self.max_running_seen = max(self.max_running_seen, self.running)
        # A disabled cache is not queried, and vLLM then records no prefix-cache stats either.
        if seq.tokens is not None and self.prefix_cache.capacity_blocks > 0:
            seq.cached_tokens = self.prefix_cache.query(seq.tokens)
            self.prefix_cache_queries_total += seq.prompt_tokens
            self.prefix_cache_hits_total += seq.cached_tokens

    def _release(self, seq: Sequence, *, completed: bool) -> None:
        self._running.discard(seq)
        self._kv_tokens -= seq.prompt_tokens + seq.generated
        if completed:
            self.completed_total += 1
        else:
            self.aborted_total += 1
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self._waiters and self.running < self.config.max_batch:
            seq, fut = self._waiters.popleft()
            self._start(seq)
            fut.set_result(None)


class Sequence:
    """One request's generation, holding a batch slot inside ``async with``.

    Call :meth:`next_token` once per output token (the first call includes the prefill) and
    :meth:`finish` when the response was delivered; a block left without ``finish`` (an
    exception, a cancellation) counts as aborted.

    ``cached_tokens`` is the prompt's prefix found in the prefix cache when the sequence was
    admitted to the batch (0 before, or when the prompt was given only as a token count).
    """

    __slots__ = ("_engine", "_finished", "cached_tokens", "generated", "prompt_tokens", "tokens")

    def __init__(self, engine: Engine, prompt: int | Tokens):
        self._engine = engine
        self._finished = False
        self.tokens = None if isinstance(prompt, int) else prompt
        self.prompt_tokens = prompt if isinstance(prompt, int) else len(prompt)
        self.cached_tokens = 0
        self.generated = 0

    async def __aenter__(self) -> Sequence:
        await self._engine._acquire(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._engine._release(self, completed=self._finished and exc is None)

    async def next_token(self) -> int:
        """Wait for the next token and return its index (0 for the first)."""
        engine = self._engine
        if self.generated == 0:
            prefill_s = engine.prefill_s(self.prompt_tokens, self.cached_tokens)
            await engine._sleep(prefill_s)
            engine.prompt_tokens_total += self.prompt_tokens  # cached or not
            engine.last_prefill_ms = prefill_s * 1000.0
            engine.prefill_ms_total += prefill_s * 1000.0
        else:
            await engine._sleep(engine.decode_step_s())
        index = self.generated
        self.generated += 1
        engine._kv_tokens += 1
        engine.generation_tokens_total += 1
        return index

    def finish(self) -> None:
        """Mark the sequence as completed; its slot is given back when the block exits."""
        self._finished = True


# Exported in vLLM's names, read from the very counters the engine keeps: (name, type, help,
# reader). vLLM's cache-usage gauges are fractions in 0..1 despite the "perc" in their names.
# The prefix-cache counters are V1's, in tokens; the hit-rate gauge is V0's, here the tokens
# hit over the tokens queried since the last reset.
_METRICS: tuple[tuple[str, str, str, Callable[[Engine], float]], ...] = (
    ("vllm:num_requests_running", "gauge", "Number of requests in the running batch.",
     lambda e: e.running),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
     lambda e: e.waiting),
    ("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
     lambda e: e.kv_cache_usage),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
     lambda e: e.kv_cache_usage),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
     lambda e: e.prompt_tokens_total),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
     lambda e: e.generation_tokens_total),
    ("vllm:request_success_total", "counter", "Count of successfully processed requests.",
     lambda e: e.completed_total),
    ("vllm:prefix_cache_queries_total", "counter",
     "Prefix cache queries, in terms of number of queried tokens.",
     lambda e: e.prefix_cache_queries_total),
    ("vllm:prefix_cache_hits_total", "counter",
     "Prefix cache hits, in terms of number of cached tokens.",
     lambda e: e.prefix_cache_hits_total),
    ("vllm:gpu_prefix_cache_hit_rate", "gauge", "GPU prefix cache block hit rate.",
     lambda e: e.prefix_cache_hit_rate),
    ("sim_requests_aborted_total", "counter", "Requests aborted before completion.",
     lambda e: e.aborted_total),
)  # fmt: skip


def render_metrics(engine: Engine, model: str) -> str:
    """Prometheus text exposition (format 0.0.4) of ``engine``'s numbers, labelled by model."""
    label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines: list[str] = []
    for name, kind, text, read in _METRICS:
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f'{name}{{model_name="{label}"}} {float(read(engine))!r}')
    return "\n".join(lines) + "\n"
