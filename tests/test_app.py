"""The proxy as a real process: start-up from a YAML file, and graceful shutdown on a signal."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import free_port, pool, proxy_config, wait_listening


@pytest.fixture
async def run_proxy(tmp_path: Path) -> AsyncIterator[object]:
    """Factory: write the config dict to a file and start ``python -m lb`` on it."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(config: dict[str, object], *cmd: str) -> asyncio.subprocess.Process:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = list(cmd) or [sys.executable, "-m", "lb"]
        with open(tmp_path / "proxy.log", "ab") as log:  # noqa: ASYNC230  # tiny local file, once
            proc = await asyncio.create_subprocess_exec(
                *argv, "--config", str(path), stdout=log, stderr=log
            )
        procs.append(proc)
        port = config["listen"]["port"]  # type: ignore[index]
        await wait_listening(port, proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def _wait_exit(proc: asyncio.subprocess.Process, timeout_s: float) -> int:
    return await asyncio.wait_for(proc.wait(), timeout_s)


async def test_sigterm_lets_streams_in_flight_finish_then_exits_zero(backends, run_proxy):
    """After SIGTERM, streams already running complete, new connections fail, exit code 0."""
    b0, b1 = await backends(2)
    config = proxy_config([pool("chat", [b0, b1])], shutdown={"grace_s": 10})
    proc = await run_proxy(config)
    port = config["listen"]["port"]
    async with aiohttp.ClientSession() as s:
        streams = [
            await s.get(f"http://127.0.0.1:{port}/stream?chunks=10&interval_ms=60")
            for _ in range(3)
        ]
        for resp in streams:
            await asyncio.wait_for(resp.content.readuntil(b";"), 5)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"http://127.0.0.1:{port}/")
        bodies = [await asyncio.wait_for(resp.read(), 10) for resp in streams]
        for resp in streams:
            resp.release()
    assert all(b"chunk-9;" in body for body in bodies)
    assert await _wait_exit(proc, 10) == 0


async def test_the_grace_period_bounds_the_wait_for_requests_in_flight(backends, run_proxy):
    """A stream longer than ``shutdown.grace_s`` is cut and the process still exits 0."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])], shutdown={"grace_s": 0.5})
    proc = await run_proxy(config)
    port = config["listen"]["port"]
    async with aiohttp.ClientSession() as s:
        resp = await s.get(f"http://127.0.0.1:{port}/stream?hold=1")
        proc.send_signal(signal.SIGTERM)
        assert await _wait_exit(proc, 10) == 0
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 5)
        resp.release()


async def test_the_console_script_serves_like_python_dash_m(backends, run_proxy):
    """The ``lb`` console script starts the same proxy as ``python -m lb``."""
    script = Path(sys.executable).with_name("lb")
    if not script.exists():
        pytest.fail(f"console script missing at {script}: is the package installed?")
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    proc = await run_proxy(config, str(script))
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{config['listen']['port']}/") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["x-lb-backend"] == "b0"
    proc.send_signal(signal.SIGINT)
    assert await _wait_exit(proc, 10) == 0


async def test_a_port_in_use_stops_start_up_with_a_message(tmp_path: Path):
    """A listener that cannot bind ends the process with a clear message, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = proxy_config(
            [{"name": "p", "backends": [{"url": f"http://127.0.0.1:{free_port()}"}]}]
        )
        config["listen"]["port"] = port
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"cannot listen: [Errno 98] listen 127.0.0.1:{port}".encode() in stderr
    assert b"Traceback" not in stderr
    assert b"Unclosed" not in stderr  # what start-up opened was closed
