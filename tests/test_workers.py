"""Several workers behind one port: real supervisor and worker processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lb.config import parse_config
from lb.worker_link import PIPE_BUF, AtomicLines
from lb.worker_merge import merge_backend, merge_metrics
from lb.workers import Backoff, cpu_count, worker_count
from tests import conftest
from tests.conftest import ADMIN_AUTH, free_port, pool, proxy_config
from tests.test_metrics import run_promtool_async

START_TIMEOUT_S = 20.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Fleet:
    """A running supervisor and what the tests need to reach it."""

    proc: asyncio.subprocess.Process
    config: dict[str, Any]
    path: Path

    @property
    def port(self) -> int:
        return int(self.config["listen"]["port"])

    def admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.config['admin']['port']}{path}"


async def _get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        return resp.status, await resp.json()


async def state(fleet: Fleet) -> dict[str, Any]:
    """The supervisor's merged state with every worker's own (``per_worker=1``)."""
    status, body = await _get_json(fleet.admin("/api/v1/state?per_worker=1"))
    assert status == 200, body
    return dict(body)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15) -> None:
    """Poll ``check`` every 0.1 s until it is true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            if await check():
                return
        except (aiohttp.ClientError, AssertionError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {what}")


async def all_serving(fleet: Fleet) -> bool:
    workers = (await state(fleet))["workers"]
    return all(w["serving"] for w in workers)


@pytest.fixture
async def run_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Fleet]]]:
    """Factory: write the config, start ``python -m lb --workers N`` on it, wait until every
    worker serves. Leaves no process behind."""
    fleets: list[Fleet] = []

    async def start(config: dict[str, Any], workers: int = 2) -> Fleet:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        with open(tmp_path / "lb.log", "ab") as log:  # noqa: ASYNC230  # tiny local file, once
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lb", "--config", str(path), "--workers", str(workers),
                stdout=log, stderr=log,
            )  # fmt: skip
        fleet = Fleet(proc, config, path)
        fleets.append(fleet)

        async def ready() -> bool:
            assert proc.returncode is None, "the supervisor exited during start-up"
            return await all_serving(fleet)

        await until(ready, "every worker serving", START_TIMEOUT_S)
        return fleet

    yield start
    for fleet in fleets:
        if fleet.proc.returncode is None:
            fleet.proc.terminate()  # the supervisor stops and reaps its workers
            try:
                await asyncio.wait_for(fleet.proc.wait(), 15)
            except TimeoutError:
                fleet.proc.kill()
                await fleet.proc.wait()


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def fresh_requests(fleet: Fleet, n: int, concurrency: int = 8) -> list[str]:
    """``n`` GETs, each on a new connection (so the kernel spreads them), ``concurrency`` at a
    time; returns the backend that answered each (``x-lb-backend``)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=concurrency)
    served: list[str] = []
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(i: int) -> None:
            async with s.get(f"http://127.0.0.1:{fleet.port}/r{i}") as resp:
                assert resp.status == 200, await resp.text()
                served.append(resp.headers["x-lb-backend"])

        await asyncio.gather(*(one(i) for i in range(n)))
    return served


async def requests_by_worker(fleet: Fleet) -> dict[str, float]:
    """``lb_requests_total`` answered 2xx, per worker, from the supervisor's /metrics."""
    async with aiohttp.ClientSession() as s, s.get(fleet.admin("/metrics")) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "lb_requests":
            for sample in family.samples:
                if sample.labels["code_class"] == "2xx":
                    worker = sample.labels["worker"]
                    out[worker] = out.get(worker, 0.0) + sample.value
    return out


async def test_two_workers_share_the_connections_and_every_request_succeeds(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """With --workers 2, requests over many connections all succeed and both workers serve."""
    b0, b1 = await backends(2)
    fleet = await run_fleet(proxy_config([pool("chat", [b0, b1])]))
    served = await fresh_requests(fleet, 200)
    assert len(served) == 200
    assert b0.hits + b1.hits == 200
    by_worker = await requests_by_worker(fleet)
    assert sum(by_worker.values()) == 200
    assert set(by_worker) == {"0", "1"} and all(by_worker.values()), by_worker


async def test_the_merged_metrics_pass_promtool(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """The supervisor's /metrics (every worker's series plus its own) passes promtool's lint."""
    b0, b1 = await backends(2)
    fleet = await run_fleet(proxy_config([pool("chat", [b0, b1])]))
    await fresh_requests(fleet, 20)
    async with aiohttp.ClientSession() as s, s.get(fleet.admin("/metrics")) as resp:
        text = await resp.text()
    assert 'lb_worker_restarts_total{worker="1"} 0.0' in text
    assert "lb_workers 2.0" in text
    code, out = await run_promtool_async("check", "metrics", stdin=text)
    assert code == 0, out


async def test_a_drain_through_the_supervisor_reaches_every_worker(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """Draining a backend on the supervisor's admin API keeps every worker's requests off it."""
    b0, b1 = await backends(2)
    fleet = await run_fleet(proxy_config([pool("chat", [b0, b1])]))
    async with (
        aiohttp.ClientSession() as s,
        s.post(fleet.admin("/api/v1/pools/chat/backends/b0/drain"), headers=ADMIN_AUTH) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["drained"] is True
    for worker in (await state(fleet))["workers"]:
        (b0_state,) = [b for b in worker["state"]["pools"][0]["backends"] if b["name"] == "b0"]
        assert b0_state["drained"] is True
    b0.hits = b1.hits = 0
    served = await fresh_requests(fleet, 100)
    assert set(served) == {"b1"}
    assert (b0.hits, b1.hits) == (0, 100)
    assert set(await requests_by_worker(fleet)) == {"0", "1"}
    status, b1_merged = await _get_json(fleet.admin("/api/v1/pools/chat/backends/b1"))
    assert (status, b1_merged["drained"], b1_merged["requests_total"]) == (200, False, 100)
    status, listed = await _get_json(fleet.admin("/api/v1/pools/chat/backends"))
    assert [(b["name"], b["drained"]) for b in listed["backends"]] == [("b0", True), ("b1", False)]


async def test_sighup_reload_reaches_every_worker(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """A backend added to the file and SIGHUP sent to the supervisor is used by both workers."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0])])
    fleet = await run_fleet(config)
    config["pools"] = [pool("chat", [b0, b1])]
    fleet.path.write_text(yaml.safe_dump(config))
    fleet.proc.send_signal(signal.SIGHUP)

    def b1_requests(worker: dict[str, Any]) -> int:
        backends = worker["state"]["pools"][0]["backends"]
        return sum(b["requests_total"] for b in backends if b["name"] == "b1")

    async def both_use_b1() -> bool:
        await fresh_requests(fleet, 10)
        return all(b1_requests(w) > 0 for w in (await state(fleet))["workers"])

    await until(both_use_b1, "both workers sending requests to the new backend")


async def test_a_refused_reload_says_why_and_every_worker_counts_it(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """An invalid file reloaded through the supervisor's API: 400 naming the key, and each
    worker's ``lb_config_reloads_total{result="failure"}`` counts it."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    fleet = await run_fleet(config)
    fleet.path.write_text(yaml.safe_dump({**config, "routes": [{"pool": "nope"}]}))
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.admin("/api/v1/reload"), headers=ADMIN_AUTH) as resp:
            assert resp.status == 400
            assert "routes[0].pool" in (await resp.json())["error"]["message"]
        async with s.get(fleet.admin("/metrics")) as resp:
            text = await resp.text()
    failures = {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "lb_config_reloads"
        for sample in family.samples
        if sample.labels.get("result") == "failure" and "worker" in sample.labels
    }
    assert failures == {"0": 1.0, "1": 1.0}


async def test_a_killed_worker_is_restarted_and_traffic_keeps_flowing(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """SIGKILL to a worker: clients retrying on a failed connection all succeed, and the
    worker comes back under a new pid with ``lb_worker_restarts_total`` counting it."""
    b0, b1 = await backends(2)
    fleet = await run_fleet(proxy_config([pool("chat", [b0, b1])]))
    victim = (await state(fleet))["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for i in range(60):
            for _attempt in range(20):  # a connection queued at the dead worker is reset
                try:
                    async with s.get(f"http://127.0.0.1:{fleet.port}/k{i}") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"request {i} failed 20 times")
            await asyncio.sleep(0.02)

    async def restarted() -> bool:
        worker = (await state(fleet))["workers"][0]
        return bool(worker["serving"] and worker["pid"] != victim and worker["restarts"] >= 1)

    await until(restarted, "worker 0 restarted")
    async with aiohttp.ClientSession() as s, s.get(fleet.admin("/metrics")) as resp:
        assert 'lb_worker_restarts_total{worker="0"} 1.0' in await resp.text()
    await fresh_requests(fleet, 40)
    assert set(await requests_by_worker(fleet)) == {"0", "1"}


async def test_sigterm_lets_streams_finish_then_every_process_exits(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """SIGTERM to the supervisor: /readyz turns 503, streams in flight in every worker finish,
    the supervisor exits 0 and no worker is left."""
    b0, b1 = await backends(2)
    fleet = await run_fleet(proxy_config([pool("chat", [b0, b1])], shutdown={"grace_s": 10}))
    pids = [w["pid"] for w in (await state(fleet))["workers"]]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        url = f"http://127.0.0.1:{fleet.port}/stream?chunks=10&interval_ms=60"
        streams = [await s.get(url) for _ in range(6)]
        for resp in streams:
            await asyncio.wait_for(resp.content.readuntil(b";"), 5)
        fleet.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        status, _ = await _get_json(fleet.admin("/readyz"))
        assert status == 503
        bodies = [await asyncio.wait_for(resp.read(), 10) for resp in streams]
        for resp in streams:
            resp.release()
    assert all(b"chunk-9;" in body for body in bodies)
    assert await asyncio.wait_for(fleet.proc.wait(), 15) == 0
    for pid in pids:  # the supervisor waited for them: reaped, not zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_workers_do_not_outlive_a_killed_supervisor(
    backends: Callable[[int], Awaitable[list[conftest.TestBackend]]], run_fleet: Any
) -> None:
    """SIGKILL to the supervisor: every worker notices, drains and exits; the port is free."""
    (b0,) = await backends(1)
    fleet = await run_fleet(proxy_config([pool("chat", [b0])]))
    pids = [w["pid"] for w in (await state(fleet))["workers"]]
    fleet.proc.kill()
    await fleet.proc.wait()

    async def all_gone() -> bool:
        return all(gone(pid) for pid in pids)

    await until(all_gone, "every worker exited", 10)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not a listener
        s.bind(("127.0.0.1", fleet.port))


async def test_a_port_in_use_stops_the_supervisor_with_a_message(tmp_path: Path) -> None:
    """A client port held by another socket: the supervisor exits 1, saying why, no trace."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = proxy_config(
            [{"name": "p", "backends": [{"url": f"http://127.0.0.1:{free_port()}"}]}]
        )
        config["listen"]["port"] = taken.getsockname()[1]
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb", "--config", str(path), "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"cannot listen" in stderr
    assert b"did not start" in stderr
    assert b"Traceback" not in stderr


def test_restart_delays_double_up_to_ten_seconds_and_reset_after_thirty() -> None:
    """The back-off is 0.5 s doubling to 10 s, and starts over after a 30 s life."""
    backoff = Backoff()
    assert [backoff.delay(1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.delay(30.0) == 0.5
    assert backoff.delay(1.0) == 1


def test_zero_or_auto_workers_means_one_per_cpu() -> None:
    """``workers: auto`` and ``workers: 0`` both resolve to the CPUs this process may use."""
    base = {"pools": [{"name": "p", "backends": [{"url": "http://127.0.0.1:1"}]}]}
    assert parse_config({**base, "workers": "auto"}).workers == 0
    assert parse_config(base).workers == 1
    assert worker_count(0) == cpu_count() >= 1
    assert worker_count(3) == 3


def test_a_bad_workers_flag_is_a_usage_error() -> None:
    """``--workers many`` is refused by the command line before anything starts."""
    result = subprocess.run(
        [sys.executable, "-m", "lb", "--workers", "many", "check"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert 'expected a number from 0 to 1024 or "auto"' in result.stderr


def test_merged_series_carry_a_worker_label() -> None:
    """Families are merged by name with HELP and TYPE once and a ``worker`` label per series."""
    text = '# HELP lb_x_total X.\n# TYPE lb_x_total counter\nlb_x_total{pool="p"} 2.0\n'
    (family,) = merge_metrics([(0, text), (1, text.replace("2.0", "3.0"))])
    assert family.name == "lb_x"
    assert [(s.labels["worker"], s.value) for s in family.samples] == [("0", 2.0), ("1", 3.0)]


def test_a_backend_merged_over_workers_sums_counts_and_ors_health() -> None:
    """Counters and histograms add up; ``healthy`` is true if any worker says so."""

    def part(in_flight: int, healthy: bool, rtt: float, held_s: float) -> dict[str, Any]:
        return {
            "name": "b0", "url": "u", "weight": 1, "effective_weight": 1.0,
            "max_concurrency": None, "healthy": healthy, "available": healthy,
            "drained": False, "ejected": False, "ejected_for_s": 0.0, "ejections_total": 0,
            "held_for_s": held_s,
            "in_flight": in_flight, "latency_estimate_s": rtt, "requests_total": 10,
            "failures_total": 1, "responses_by_class": {"2xx": 9, "5xx": 1},
            "latency": {"buckets": [0.1], "counts": [4, 6], "sum": 2.0},
        }  # fmt: skip

    merged = merge_backend([part(1, True, 0.1, 0.0), part(2, False, 0.3, 12.0)])
    assert merged["in_flight"] == 3 and merged["requests_total"] == 20
    assert merged["held_for_s"] == 12.0
    assert merged["healthy"] is True
    assert merged["latency_estimate_s"] == pytest.approx(0.2)
    assert merged["responses_by_class"] == {"2xx": 18, "5xx": 2}
    assert merged["latency"] == {"buckets": [0.1], "counts": [8, 12], "sum": 4.0}


def test_access_log_lines_are_written_whole_in_atomic_pieces() -> None:
    """A batch larger than PIPE_BUF goes out in line-aligned writes of at most PIPE_BUF."""
    pieces: list[bytes] = []

    def write(fd: int, data: memoryview) -> int:
        pieces.append(bytes(data))
        return len(data)

    batch = "".join(f'{{"n":{i},"pad":"{"x" * 90}"}}\n' for i in range(200))
    assert len(batch) > 4 * PIPE_BUF
    AtomicLines(1, write).write(batch)
    assert b"".join(pieces).decode() == batch
    assert max(len(p) for p in pieces) <= PIPE_BUF
    assert all(p.endswith(b"\n") for p in pieces)
