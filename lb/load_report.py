"""Load reports: scrape each backend's Prometheus endpoint for the load its model server reports.

What. The proxy counts the requests *it* has in flight, but a model server's real load is in
its engine: requests queued for a batch slot, the running batch, the share of the KV cache in
use. Most servers export these as Prometheus gauges. :class:`LoadReporter` reads them on an
interval and writes them to ``Backend.reported_waiting``, ``reported_running`` and
``reported_kv_usage`` (a 0..1 fraction), stamping ``reported_at_s`` with the injected clock.
It is the only writer of those fields; ``least_loaded`` reads them.

How. One task per backend GETs ``{scheme}://{host}:{port}{path}`` every ``interval_s`` (start
to start; a scrape slower than the interval delays the next one, none overlap) over one
keep-alive connection per backend (``limit_per_host=1``). A scrape fails on any error, a
status other than 200, a body over :data:`MAX_BODY_BYTES`, or taking longer than
``timeout_s``; a failed scrape changes no value and does not refresh ``reported_at_s``, so the
report goes stale after ``max_age_s`` and strategies stop trusting it. A successful scrape
sets every field: a metric absent from the body sets its field to None, and is logged once per
backend at warning (engine metric names change between versions, and a renamed gauge must
not silently turn a balancer into a random one). Per-series values: counts (waiting,
running) are summed over all series of a name (several ``model_name`` or ``engine`` labels
are parts of one server); KV usage, a fraction, is averaged over its series (the engines of
a data-parallel server each report their own cache). NaN and infinite samples are skipped.

Presets (names as the servers export them):

- ``vllm``: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``, and KV usage from
  ``vllm:kv_cache_usage_perc`` (V1 engine) or, when that is absent, the older
  ``vllm:gpu_cache_usage_perc``. Both are 0..1 fractions despite the ``_perc``.
- ``sglang``: ``sglang:num_queue_reqs``, ``sglang:num_running_reqs``, ``sglang:token_usage``
  (the share of the KV token pool in use, 0..1).
- ``tgi``: ``tgi_queue_size``, ``tgi_batch_current_size``; TGI exports no KV-cache gauge.
- ``triton``: ``nv_inference_pending_request_count`` (requests waiting for a model instance,
  summed over models) only. Triton core has no gauge of executing requests:
  ``nv_inference_exec_count`` is a cumulative counter, which read as a gauge would make the
  busiest-ever backend look loaded forever, and its rate measures throughput, not occupancy.
  Nor does it have a KV gauge (TensorRT-LLM's is one label value of a multi-valued metric).
- ``custom``: only the names under ``metrics``, which also override a preset's.

Cost. Per backend, one GET per ``interval_s`` (4 per second by default) on a connection that
stays open, asking for an uncompressed body (``Accept-Encoding: identity``: decompressing
costs the proxy more CPU than the bytes cost a LAN). A vLLM body is tens of kilobytes, mostly
histogram buckets; rendering it costs the server a few milliseconds of CPU in its API process.
Parsing never splits the body into lines: :func:`parse_metrics` finds each wanted name at a
line start with ``bytes.find`` (C speed) and decodes only those few lines: about 0.15 ms of
the proxy's event loop for a 170 KB vLLM page with the four vLLM names, not a full parse.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from lb.backend import Backend
from lb.config_load_report import LoadReport
from lb.probing import ProbeTasks, describe_failure, probe_session
from lb.tls import aiohttp_tls

log = logging.getLogger("lb.load_report")

Clock = Callable[[], float]

USER_AGENT = "lb-load-report"
# A body longer than this fails the scrape (and aiohttp closes that connection).
MAX_BODY_BYTES = 8 << 20
_READ_CHUNK = 64 << 10
# Scaled KV usage above this is not a fraction: most likely a percentage with scale 1.
_KV_SANE_MAX = 1.5


@dataclass(frozen=True, slots=True)
class MetricNames:
    """Candidate metric names per field, first present wins; empty: the field is not read."""

    waiting: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()


PRESETS: dict[str, MetricNames] = {
    "vllm": MetricNames(
        waiting=("vllm:num_requests_waiting",),
        running=("vllm:num_requests_running",),
        # V1 renamed the gauge; versions in between export both, with the same value.
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    "sglang": MetricNames(
        waiting=("sglang:num_queue_reqs",),
        running=("sglang:num_running_reqs",),
        kv_usage=("sglang:token_usage",),
    ),
    "tgi": MetricNames(waiting=("tgi_queue_size",), running=("tgi_batch_current_size",)),
    "triton": MetricNames(waiting=("nv_inference_pending_request_count",)),
    "custom": MetricNames(),
}

_FIELDS = ("waiting", "running", "kv_usage")


def metric_names(config: LoadReport) -> MetricNames:
    """The names ``config`` asks for: its preset's, with any name under ``metrics`` replacing
    the preset's candidates for that field."""
    preset = PRESETS[config.preset]
    m = config.metrics
    return MetricNames(
        waiting=(m.waiting,) if m.waiting else preset.waiting,
        running=(m.running,) if m.running else preset.running,
        kv_usage=(m.kv_usage,) if m.kv_usage else preset.kv_usage,
    )


# -- parsing --------------------------------------------------------------------------------------


def parse_metrics(text: bytes, names: Iterable[str]) -> dict[str, tuple[float, int]]:
    """Read the samples of ``names`` from a Prometheus text exposition.

    Returns, for each name that has at least one sample line, ``(total, series)``: the sum of
    its finite sample values and how many there were (NaN and ±Inf samples are skipped, so a
    name whose every sample is NaN maps to ``(0.0, 0)``). Names without a sample are absent.
    Comments (``# HELP``, ``# TYPE``) never match; a name is matched whole, so
    ``vllm:num_requests_waiting`` does not pick up ``vllm:num_requests_waiting_by_reason``.
    Malformed sample lines are skipped. Never raises on any input.
    """
    found: dict[str, tuple[float, int]] = {}
    for name in names:
        key = name.encode()
        needle = b"\n" + key
        total = 0.0
        series = 0
        seen = False
        # Line starts that begin with the name: the start of the text, then each "\n" + name.
        start = 0 if text.startswith(key) else _next_line_start(text, needle, 0)
        while start >= 0:
            end = text.find(b"\n", start)
            if end < 0:
                end = len(text)
            value = _sample_value(text[start + len(key) : end])
            if value is not None:
                seen = True
                if math.isfinite(value):
                    total += value
                    series += 1
            start = _next_line_start(text, needle, end)
        if seen:
            found[name] = (total, series)
    return found


def _next_line_start(text: bytes, needle: bytes, pos: int) -> int:
    i = text.find(needle, pos)
    return -1 if i < 0 else i + 1


def _sample_value(rest: bytes) -> float | None:
    """The value of a sample line, given what follows the metric name; None if the line is
    another metric (the name was a prefix) or malformed. May return NaN or ±Inf."""
    if rest.startswith(b"{"):
        close = _labels_end(rest)
        if close < 0:
            return None
        rest = rest[close + 1 :]
    elif not rest.startswith((b" ", b"\t")):
        return None  # e.g. name_bucket, name_by_reason: a different metric
    # "value [timestamp]"; anything after (an OpenMetrics exemplar) is ignored.
    fields = rest.split(None, 1)
    if not fields:
        return None
    try:
        return float(fields[0])  # takes "NaN", "+Inf", "-Inf", "1.5e+06" as bytes
    except ValueError:
        return None


def _labels_end(rest: bytes) -> int:
    """Index of the ``}`` closing the label set that opens ``rest``, or -1. Label values are
    quoted and may hold ``}``, ``"`` (escaped as ``\\"``) and backslashes."""
    i = 1
    while True:
        close = rest.find(b"}", i)
        if close < 0:
            return -1
        quote = rest.find(b'"', i, close)
        if quote < 0:
            return close
        # Skip the quoted value: find its closing quote, one not escaped by a backslash.
        j = quote + 1
        while True:
            j = rest.find(b'"', j)
            if j < 0:
                return -1
            backslashes = 0
            k = j - 1
            while rest[k] == 0x5C:  # "\"
                backslashes += 1
                k -= 1
            if backslashes % 2 == 0:
                break
            j += 1
        i = j + 1


# -- the reporter ---------------------------------------------------------------------------------


class ScrapeError(Exception):
    """A scrape that got an answer, but not a usable one (status, size)."""


@dataclass(slots=True)
class ScrapeStats:
    """Counters of one backend's scrapes, for metrics and the admin API."""

    ok_total: int = 0
    failed_total: int = 0
    last_duration_s: float = 0.0  # 0.0 until the first scrape ends
    last_error: str = ""  # reason of the last failure; "" after a success
    missing: tuple[str, ...] = ()  # fields the last successful scrape had no metric for
    # Warned about once already, per backend: "missing:<field>", "kv_scale", "failing".
    warned: set[str] = field(default_factory=set)


class LoadReporter:
    """Scrapes the backends of one pool and writes their reported load onto them.

    Nothing runs until :meth:`start`, which needs a running loop; :meth:`stop` ends it. With
    ``config.enabled`` false, ``start`` does nothing and the fields stay as they are.
    ``clock`` (default ``time.monotonic``) stamps ``reported_at_s``; strategies must age the
    reports with the same clock. ``rng`` (default: a fresh ``random.Random``) spreads the
    first scrapes over one interval. ``previous`` is the reporter this one replaces on a
    reload: the counters (and the once-only warnings) of backends that stay carry over.
    """

    def __init__(
        self,
        pool_name: str,
        backends: Sequence[Backend],
        config: LoadReport,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        previous: LoadReporter | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.backends = tuple(backends)
        self.config = config
        self.clock = clock
        self.names = metric_names(config)
        self._wanted: tuple[str, ...] = tuple(
            name for f in _FIELDS for name in getattr(self.names, f)
        )
        self._rng = rng if rng is not None else random.Random()
        kept: dict[Backend, ScrapeStats] = previous._stats if previous is not None else {}
        self._stats: dict[Backend, ScrapeStats] = {
            b: kept.get(b) or ScrapeStats() for b in self.backends
        }
        self._probes = ProbeTasks()
        self._started = False

    def stats(self, backend: Backend) -> ScrapeStats:
        """The scrape counters of ``backend``; ``KeyError`` if it is not one of this reporter's."""
        return self._stats[backend]

    def has(self, backend: Backend) -> bool:
        """True if ``backend`` is one this reporter scrapes."""
        return backend in self._stats

    def start(self) -> None:
        """Start one scrape task per backend; call once, inside a running loop."""
        if self._started:
            raise RuntimeError("load reporter already started")
        self._started = True
        if not self.config.enabled or not self.backends:
            return
        open_session = functools.partial(
            probe_session,
            self.config.timeout_s,
            {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._probes.start("load-report", self.pool_name, self.backends, self._run, open_session)

    async def stop(self) -> None:
        """Cancel and await every scrape task, then close the HTTP session; idempotent."""
        await self._probes.stop()

    async def _run(self, backend: Backend) -> None:
        interval_s = self.config.interval_s
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._rng.random() * interval_s)
        while True:
            started = loop.time()
            await self._scrape(backend)
            # Start to start, so reports arrive every interval_s while scrapes are fast.
            await asyncio.sleep(max(0.0, started + interval_s - loop.time()))

    async def _scrape(self, backend: Backend) -> None:
        """One scrape of ``backend``, recorded. Never raises, except ``CancelledError``."""
        stats = self._stats[backend]
        started = time.monotonic()
        try:
            body = await self._fetch(backend)
        except Exception as exc:
            stats.last_duration_s = time.monotonic() - started
            self._failed(backend, stats, self._describe(exc))
            return
        values = parse_metrics(body, self._wanted)
        stats.last_duration_s = time.monotonic() - started
        self._apply(backend, stats, values)

    async def _fetch(self, backend: Backend) -> bytes:
        assert self._probes.session is not None  # set by start()
        url = backend.origin + self.config.path
        # The session's total timeout covers connecting, the head and the body read. The body
        # is read to its end even on a bad status, so the connection can be kept alive.
        async with self._probes.session.get(
            url, allow_redirects=False, **aiohttp_tls(backend)
        ) as resp:
            if resp.content_length is not None and resp.content_length > MAX_BODY_BYTES:
                raise ScrapeError(f"body of {resp.content_length} bytes is too large")
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await resp.content.read(_READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ScrapeError(f"body over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            if resp.status != 200:
                raise ScrapeError(f"status {resp.status}")
        return b"".join(chunks)

    def _apply(
        self, backend: Backend, stats: ScrapeStats, values: dict[str, tuple[float, int]]
    ) -> None:
        """Write a successful scrape's values onto ``backend`` and stamp it fresh."""
        names = self.names
        waiting = _first(values, names.waiting)
        running = _first(values, names.running)
        kv = _first(values, names.kv_usage, mean=True)
        if kv is not None:
            kv *= self.config.kv_usage_scale
            if kv > _KV_SANE_MAX:
                self._warn_once(backend, stats, "kv_scale",
                                "KV usage reads %g, not a 0..1 fraction: set kv_usage_scale "
                                "(0.01 for a percentage)", kv)  # fmt: skip
        # A negative count or share is no load a server can have: not trusted (a backend
        # reporting a queue of -1 would otherwise look emptier than an idle one).
        if waiting is not None and waiting < 0:
            self._distrust(backend, stats, "waiting", waiting)
            waiting = None
        if running is not None and running < 0:
            self._distrust(backend, stats, "running", running)
            running = None
        if kv is not None and kv < 0:
            self._distrust(backend, stats, "kv_usage", kv)
            kv = None
        backend.reported_waiting = waiting
        backend.reported_running = running
        backend.reported_kv_usage = kv
        backend.reported_at_s = self.clock()

        missing = tuple(
            f for f in _FIELDS if getattr(names, f) and not _present(values, getattr(names, f))
        )
        for f in missing:
            self._warn_once(backend, stats, f"missing:{f}",
                            "%s metric %s is not in the scrape; reported %s stays unknown "
                            "(did the server's metric names change?)",
                            f, " or ".join(getattr(names, f)), f)  # fmt: skip
        stats.missing = missing
        stats.ok_total += 1
        stats.last_error = ""
        if "failing" in stats.warned:
            stats.warned.discard("failing")
            log.info("load report: pool=%s backend=%s scrapes succeed again",
                     self.pool_name, backend.name,
                     extra={"event": "load_report_recovered", "pool": self.pool_name,
                            "backend": backend.name})  # fmt: skip

    def _failed(self, backend: Backend, stats: ScrapeStats, reason: str) -> None:
        stats.failed_total += 1
        stats.last_error = reason
        # Loud on the first failure of a streak, quiet for the rest of it.
        if "failing" not in stats.warned:
            stats.warned.add("failing")
            log.warning("load report: pool=%s backend=%s scrape failed: %s; its report goes "
                        "stale after %gs", self.pool_name, backend.name, reason,
                        self.config.max_age_s,
                        extra={"event": "load_report_failing", "pool": self.pool_name,
                               "backend": backend.name, "reason": reason})  # fmt: skip
        else:
            log.debug("load report: pool=%s backend=%s scrape failed: %s",
                      self.pool_name, backend.name, reason)  # fmt: skip

    def _distrust(self, backend: Backend, stats: ScrapeStats, field: str, value: float) -> None:
        self._warn_once(backend, stats, f"negative:{field}",
                        "%s reads %g, below 0; it is taken as unknown", field, value)  # fmt: skip

    def _warn_once(
        self, backend: Backend, stats: ScrapeStats, key: str, message: str, *args: object
    ) -> None:
        if key in stats.warned:
            return
        stats.warned.add(key)
        log.warning("load report: pool=%s backend=%s: " + message,
                    self.pool_name, backend.name, *args)  # fmt: skip

    def _describe(self, exc: Exception) -> str:
        """A short reason for a failed scrape."""
        if isinstance(exc, ScrapeError):
            return str(exc)
        return describe_failure(exc, self.config.timeout_s)


def _present(values: dict[str, tuple[float, int]], candidates: tuple[str, ...]) -> bool:
    for name in candidates:
        if name in values:
            return True
    return False


def _first(
    values: dict[str, tuple[float, int]], candidates: tuple[str, ...], *, mean: bool = False
) -> float | None:
    """The value of the first candidate present: the sum of its series (or their mean); None
    when none is present or the first present one has no finite sample."""
    for name in candidates:
        found = values.get(name)
        if found is not None:
            total, series = found
            if series == 0:
                return None
            return total / series if mean else total
    return None
