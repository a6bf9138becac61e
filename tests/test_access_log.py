"""The access log: one JSON line per request with its outcome, sampling that keeps errors,
batched writes, and the real process writing access lines to stdout and JSON logs to stderr."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import lb.access_log
from lb.access_log import AccessLogger
from lb.app import App
from tests.conftest import free_port, pool, proxy_config, raw_exchange, url, wait_listening

FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "route",
    "pool",
    "backend",
    "status",
    "attempts",
    "bytes_in",
    "bytes_out",
    "ttfb_s",
    "duration_s",
    "outcome",
}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _capture(app: App) -> io.StringIO:
    """Send ``app``'s access log, with its configured settings, to a string buffer."""
    assert app.proxy is not None
    live = app.proxy.access_log
    buf = io.StringIO()
    app.proxy.access_log = AccessLogger(
        enabled=live.enabled, sample_rate=live.sample_rate, stream=buf
    )
    return buf


def _lines(app: App, buf: io.StringIO) -> list[dict[str, Any]]:
    assert app.proxy is not None
    app.proxy.access_log.flush()
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def _no_health_checks(p: dict[str, Any]) -> dict[str, Any]:
    return {**p, "health_check": {"enabled": False}}


async def test_a_request_produces_one_line_with_every_field(backends, start_proxy):
    """A proxied POST is logged once, with exactly the documented fields and their values."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    buf = _capture(app)
    body = b"x" * 1234
    head = (
        b"POST /v1/chat?model=m HTTP/1.1\r\nhost: lb\r\nx-request-id: req-42\r\n"
        b"content-length: 1234\r\nconnection: close\r\n\r\n"
    )
    raw = await raw_exchange(app.port, head + body)
    assert raw.startswith(b"HTTP/1.1 200 ")
    (line,) = _lines(app, buf)
    assert set(line) == FIELDS
    assert ISO_UTC.match(line["time"])
    assert {k: line[k] for k in FIELDS - {"time", "ttfb_s", "duration_s"}} == {
        "request_id": "req-42",
        "method": "POST",
        "path": "/v1/chat",
        "route": "default",
        "pool": "chat",
        "backend": "b0",
        "status": 200,
        "attempts": 1,
        "bytes_in": 1234,
        "bytes_out": len(raw),
        "outcome": "ok",
    }
    assert 0 <= line["ttfb_s"] <= line["duration_s"] < 10


async def test_a_generated_request_id_is_the_one_returned_to_the_client(backends, start_proxy):
    """Without an incoming request id, the logged id is the one the response carries."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    buf = _capture(app)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/echo")) as resp:
        returned = resp.headers["x-request-id"]
    (line,) = _lines(app, buf)
    assert returned
    assert line["request_id"] == returned


async def test_an_unrouted_request_is_logged_as_no_route(backends, start_proxy):
    """A 404 for a path no route matches is logged with no pool, no backend and no attempt."""
    (b0,) = await backends(1)
    app = await start_proxy(
        proxy_config([pool("chat", [b0])], routes=[{"path_prefix": "/v1/", "pool": "chat"}])
    )
    buf = _capture(app)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/other")) as resp:
        assert resp.status == 404
    (line,) = _lines(app, buf)
    assert (line["status"], line["outcome"], line["path"]) == (404, "no_route", "/other")
    assert (line["route"], line["pool"], line["backend"], line["attempts"]) == (None, None, None, 0)
    assert line["bytes_in"] == 0
    assert line["bytes_out"] > 0


async def test_a_request_refused_before_it_was_read_is_logged_with_its_status(
    backends, start_proxy
):
    """Malformed input answered 400 never reaches a handler, but still gets its line, with
    the status and the error type as the outcome (HAProxy's ``<BADREQ>``)."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    buf = _capture(app)
    raw = await raw_exchange(app.port, b"GET /a b c HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 ")
    (line,) = _lines(app, buf)
    assert set(line) == FIELDS
    assert (line["status"], line["outcome"], line["pool"], line["attempts"]) == (
        400,
        "bad_request",
        None,
        0,
    )


async def test_a_body_refused_in_the_read_that_brought_its_head_is_logged_once(
    backends, start_proxy
):
    """A chunked body over ``max_body_bytes`` arriving with its head is refused before the
    handler runs: the 413 still gets its one line, with the request's method and path."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], limits={"max_body_bytes": 1000}))
    buf = _capture(app)
    head = b"POST /v1/big HTTP/1.1\r\nhost: lb\r\ntransfer-encoding: chunked\r\n\r\n"
    raw = await raw_exchange(app.port, head + b"7d0\r\n" + b"x" * 2000 + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 413 ")
    (line,) = _lines(app, buf)
    assert (line["status"], line["outcome"], line["method"], line["path"]) == (
        413,
        "body_too_large",
        "POST",
        "/v1/big",
    )
    assert b0.hits == 0


async def test_connections_refused_over_max_connections_are_counted_but_not_logged_each(
    backends, start_proxy
):
    """A connection flood is not an access-log flood: refusals count in the metrics only."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], limits={"max_connections": 1}))
    buf = _capture(app)
    _, held = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        for _ in range(100):  # bounded: 5 s
            if app.proxy.connections:
                break
            await asyncio.sleep(0.05)
        for _ in range(3):
            raw = await raw_exchange(app.port, b"GET / HTTP/1.1\r\nhost: lb\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 503 ")
    finally:
        held.close()
    assert _lines(app, buf) == []
    assert app.proxy.error_responses[(503, "overloaded")] == 3


async def test_a_request_refused_for_its_key_is_logged_under_the_route_that_asked(
    backends, start_proxy
):
    """A 401 names the route whose key was missing, as the metrics count it."""
    (b0,) = await backends(1)
    routes = [{"path_prefix": "/", "pool": "chat", "name": "keyed", "auth": {"api_keys": ["k"]}}]
    app = await start_proxy(proxy_config([pool("chat", [b0])], routes=routes))
    buf = _capture(app)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/x")) as resp:
        assert resp.status == 401
    (line,) = _lines(app, buf)
    assert (line["status"], line["route"], line["outcome"]) == (401, "keyed", "unauthorized")


async def test_the_route_is_logged_by_its_name_or_its_index(backends, start_proxy):
    """A named route is logged under its name, an unnamed one as route-<index>."""
    (b0,) = await backends(1)
    routes = [
        {"name": "chat-api", "path_prefix": "/v1/chat", "pool": "chat"},
        {"path_prefix": "/", "pool": "chat"},
    ]
    app = await start_proxy(proxy_config([pool("chat", [b0])], routes=routes))
    buf = _capture(app)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/health"):
            async with s.get(url(app, path)) as resp:
                assert resp.status == 200
    assert [line["route"] for line in _lines(app, buf)] == ["chat-api", "route-1"]


async def test_a_refused_backend_is_logged_as_502_after_every_try(start_proxy):
    """A backend that refuses connections gives a 502 line with attempts = max_retries + 1."""
    dead = {"url": f"http://127.0.0.1:{free_port()}", "name": "dead"}
    p = _no_health_checks({"name": "chat", "backends": [dead], "retry": {"max_retries": 2}})
    app = await start_proxy(proxy_config([p]))
    buf = _capture(app)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/v1/chat")) as resp:
        assert resp.status == 502
    (line,) = _lines(app, buf)
    assert (line["status"], line["outcome"]) == (502, "backend_unreachable")
    assert (line["pool"], line["backend"], line["attempts"]) == ("chat", "dead", 3)


async def test_the_query_string_is_not_logged(backends, start_proxy):
    """Only the path is logged: a query string (which may hold secrets) is left out."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    buf = _capture(app)
    async with aiohttp.ClientSession() as s, s.get(url(app, "/echo?token=s3cr3t")) as resp:
        assert resp.status == 200
    (line,) = _lines(app, buf)
    assert line["path"] == "/echo"
    assert "s3cr3t" not in buf.getvalue()
    assert "token" not in buf.getvalue()


async def test_a_disabled_access_log_writes_nothing(backends, start_proxy, capsys):
    """With ``access_log.enabled: false`` neither a success nor an error writes a line."""
    (b0,) = await backends(1)
    app = await start_proxy(
        proxy_config(
            [pool("chat", [b0])],
            routes=[{"path_prefix": "/v1/", "pool": "chat"}],
            access_log={"enabled": False},
        )
    )
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/echo", "/nowhere"):
            async with s.get(url(app, path)):
                pass
    assert app.proxy is not None
    app.proxy.access_log.flush()
    assert capsys.readouterr().out == ""


async def test_a_zero_sample_rate_drops_successes_but_keeps_server_errors(start_proxy, backends):
    """With ``sample_rate: 0.0`` a 200 and a 404 are not logged but a 502 is."""
    (b0,) = await backends(1)
    dead = {"url": f"http://127.0.0.1:{free_port()}", "name": "dead"}
    app = await start_proxy(
        proxy_config(
            [pool("chat", [b0]), _no_health_checks({"name": "gone", "backends": [dead]})],
            routes=[
                {"path_prefix": "/v1/", "pool": "chat"},
                {"path_prefix": "/gone/", "pool": "gone"},
            ],
            access_log={"sample_rate": 0.0},
        )
    )
    buf = _capture(app)
    async with aiohttp.ClientSession() as s:
        for path, status in (("/v1/echo", 200), ("/nowhere", 404), ("/gone/x", 502)):
            async with s.get(url(app, path)) as resp:
                assert resp.status == status
    lines = _lines(app, buf)
    assert [(line["path"], line["status"]) for line in lines] == [("/gone/x", 502)]


async def test_a_zero_sample_rate_from_the_config_reaches_the_running_logger(
    backends, start_proxy, capsys
):
    """The configured sample rate governs what the running proxy writes on stdout."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])], access_log={"sample_rate": 0.0}))
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(url(app, "/echo")) as resp:
                assert resp.status == 200
    assert app.proxy is not None
    app.proxy.access_log.flush()
    assert capsys.readouterr().out == ""


async def test_a_client_gone_mid_stream_is_logged_as_client_gone(backends, start_proxy):
    """A client that disconnects during a stream leaves one line with outcome client_gone."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    buf = _capture(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /stream?chunks=100&interval_ms=20 HTTP/1.1\r\nhost: lb\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"chunk-0;"), 5)
    writer.close()
    for _ in range(100):
        if b0.aborted:
            break
        await asyncio.sleep(0.02)
    assert b0.aborted == 1
    lines = []
    for _ in range(100):
        lines = _lines(app, buf)
        if lines:
            break
        await asyncio.sleep(0.02)
    (line,) = lines
    assert (line["path"], line["backend"], line["outcome"]) == ("/stream", "b0", "client_gone")
    assert line["bytes_out"] > 0


class _CountingStream(io.StringIO):
    """A text stream that counts its write() calls."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


async def test_lines_are_written_in_one_batch(backends, start_proxy, monkeypatch):
    """Ten requests finishing within one flush interval cost one write, made by the timer."""
    monkeypatch.setattr(lb.access_log, "FLUSH_INTERVAL_S", 1.0)
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0])]))
    assert app.proxy is not None
    stream = _CountingStream()
    app.proxy.access_log = AccessLogger(stream=stream)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            async with s.get(url(app, f"/echo/{i}")) as resp:
                assert resp.status == 200

        await asyncio.gather(*(one(i) for i in range(10)))
    assert stream.writes == 0
    for _ in range(100):
        if stream.writes:
            break
        await asyncio.sleep(0.05)
    assert stream.writes == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(f"/echo/{i}" for i in range(10))


# -- the real process --------------------------------------------------------------------------


async def test_the_process_writes_access_lines_on_stdout_and_json_logs_on_stderr(
    backends, tmp_path: Path
):
    """``python -m lb``: a JSON access line per request on stdout; JSON log objects on stderr."""
    (b0,) = await backends(1)
    config = proxy_config([pool("chat", [b0])])
    port = config["listen"]["port"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    # Two local files opened once, before the process starts: blocking open() is harmless.
    with open(out_path, "wb") as out, open(err_path, "wb") as err:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb", "--config", str(path), stdout=out, stderr=err
        )
    try:
        await wait_listening(port, proc)
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{port}/v1/chat?x=1", data=b"hello") as resp,
        ):
            assert resp.status == 200
            request_id = resp.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    access = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(access) == 1
    assert set(access[0]) == FIELDS
    assert (access[0]["request_id"], access[0]["path"], access[0]["bytes_in"]) == (
        request_id,
        "/v1/chat",
        5,
    )
    logs = [json.loads(line) for line in err_path.read_text().splitlines() if line.strip()]
    assert logs
    for record in logs:
        assert isinstance(record, dict)
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert ISO_UTC.match(record["time"])
    listening = [r for r in logs if r["message"].startswith("proxy listening")]
    assert len(listening) == 1
    assert (listening[0]["level"], listening[0]["logger"]) == ("info", "lb")
    assert f"127.0.0.1:{port}" in listening[0]["message"]


@pytest.mark.parametrize("status", [0, 500, 502, 503])
def test_failures_are_always_wanted_whatever_the_sample_rate(status):
    """A request with no answer or a 5xx is logged even at sample rate 0."""
    assert AccessLogger(sample_rate=0.0).wants(status)


def test_a_disabled_logger_wants_nothing():
    """``enabled=False`` drops even failed requests."""
    assert not AccessLogger(enabled=False).wants(502)
