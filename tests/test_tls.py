"""TLS to backends: https:// backends behind a private CA, checked as the pool's ``tls`` says,
by the data plane and the health checks alike. Real TLS servers on 127.0.0.1, certificates
from a throwaway CA (trustme)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from lb.app import App
from lb.build import build_pools
from lb.config import ConfigError, parse_config
from tests.conftest import proxy_config, url


@dataclass
class TLSBackend:
    port: int
    hits: int = 0
    probes: int = 0
    client_cert_subjects: list[str] | None = None

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def tls_backend(
    ca: trustme.CA,
) -> AsyncIterator[Callable[..., Awaitable[TLSBackend]]]:
    """Factory: an aiohttp server on 127.0.0.1 speaking TLS with a certificate for ``names``;
    ``require_client_cert`` makes it refuse clients without a certificate from ``ca``."""
    runners: list[web.AppRunner] = []

    async def start(
        names: tuple[str, ...] = ("127.0.0.1",), require_client_cert: bool = False
    ) -> TLSBackend:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        if require_client_cert:
            ca.configure_trust(context)
            context.verify_mode = ssl.CERT_REQUIRED
        state: dict[str, TLSBackend] = {}

        async def echo(request: web.Request) -> web.Response:
            backend = state["backend"]
            backend.hits += 1
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            return web.json_response({"path": request.path, "client_cert": bool(peer)})

        async def health(request: web.Request) -> web.Response:
            state["backend"].probes += 1
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        runners.append(runner)
        backend = TLSBackend(port=runner.addresses[0][1])
        state["backend"] = backend
        return backend

    yield start
    for runner in runners:
        await runner.cleanup()


def tls_pool(backend: TLSBackend, tls: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "secure",
        "backends": [{"url": backend.url(), "name": "s0"}],
        "retry": {"max_retries": 0},
        **extra,
    }
    if tls is not None:
        entry["tls"] = tls
    return entry


async def get(app: App, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url(app, path)) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_backend_signed_by_the_pools_ca_file_serves_requests_over_tls(
    tls_backend, ca_file, start_proxy
):
    backend = await tls_backend()
    app = await start_proxy(proxy_config([tls_pool(backend, {"ca_file": ca_file})]))
    status, body = await get(app, "/v1/chat/completions")
    assert status == 200
    assert body["path"] == "/v1/chat/completions"
    assert backend.hits == 1


async def test_a_backend_the_system_cas_do_not_trust_is_refused_not_silently_accepted(
    tls_backend, start_proxy
):
    backend = await tls_backend()
    app = await start_proxy(proxy_config([tls_pool(backend, None)]))
    status, body = await get(app, "/v1/chat/completions")
    assert status == 502
    assert body["error"]["type"] == "backend_unreachable"
    assert "certificate" in body["error"]["message"].lower()
    assert backend.hits == 0


async def test_verify_false_accepts_any_certificate(tls_backend, start_proxy):
    backend = await tls_backend()
    app = await start_proxy(proxy_config([tls_pool(backend, {"verify": False})]))
    status, _ = await get(app, "/anything")
    assert status == 200
    assert backend.hits == 1


async def test_server_name_is_the_name_checked_in_the_certificate(
    tls_backend, ca_file, start_proxy
):
    backend = await tls_backend(names=("model.internal",))
    wrong = await start_proxy(proxy_config([tls_pool(backend, {"ca_file": ca_file})]))
    status, _ = await get(wrong, "/x")
    assert status == 502  # the certificate is not for 127.0.0.1
    right = await start_proxy(
        proxy_config([tls_pool(backend, {"ca_file": ca_file, "server_name": "model.internal"})])
    )
    status, _ = await get(right, "/x")
    assert status == 200
    assert backend.hits == 1


async def test_a_client_certificate_is_shown_to_a_backend_that_requires_one(
    tls_backend, ca, ca_file, tmp_path, start_proxy
):
    backend = await tls_backend(require_client_cert=True)
    client = ca.issue_cert("lb.proxy")
    cert_file = tmp_path / "client.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    without = await start_proxy(proxy_config([tls_pool(backend, {"ca_file": ca_file})]))
    status, _ = await get(without, "/x")
    assert status == 502
    with_cert = await start_proxy(
        proxy_config([tls_pool(backend, {"ca_file": ca_file, "cert_file": str(cert_file)})])
    )
    status, body = await get(with_cert, "/x")
    assert status == 200
    assert body["client_cert"] is True


async def test_health_checks_use_the_pools_tls_settings(tls_backend, ca_file, start_proxy):
    backend = await tls_backend()
    health = {"interval_s": 0.05, "timeout_s": 1, "unhealthy_threshold": 1}
    app = await start_proxy(
        proxy_config([tls_pool(backend, {"ca_file": ca_file}, health_check=health)])
    )
    for _ in range(100):
        if backend.probes >= 2:
            break
        await asyncio.sleep(0.02)
    assert backend.probes >= 2
    assert app.proxy.pools["secure"].backends[0].healthy


def test_a_ca_file_that_cannot_be_read_stops_the_config_with_its_key(tmp_path):
    missing = str(tmp_path / "nope.pem")
    config = parse_config(
        {
            "pools": [
                {
                    "name": "secure",
                    "backends": [{"url": "https://10.0.0.1:8443"}],
                    "tls": {"ca_file": missing},
                }
            ]
        },
        "test",
    )
    with pytest.raises(ConfigError) as caught:
        build_pools(config, "test")
    assert caught.value.key == "pools[0].tls"
    assert "cannot load ca_file" in caught.value.reason
    assert missing in caught.value.reason


def test_a_key_file_without_a_cert_file_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "pools": [
                    {
                        "name": "secure",
                        "backends": [{"url": "https://10.0.0.1:8443"}],
                        "tls": {"key_file": "/etc/lb/key.pem"},
                    }
                ]
            },
            "test",
        )
    assert caught.value.key.startswith("pools[0].tls")
    assert "key_file is set but cert_file is not" in caught.value.reason


def test_tls_settings_on_a_pool_of_plain_http_backends_are_a_config_error():
    """A CA file beside http:// URLs is a scheme left unchanged: stopping says so, where
    going on would send the pool's traffic unencrypted."""
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "pools": [
                    {
                        "name": "secure",
                        "backends": [{"url": "http://10.0.0.1:8443"}],
                        "tls": {"ca_file": "/etc/lb/ca.pem"},
                    }
                ]
            },
            "test",
        )
    assert caught.value.key == "pools[0].tls"
    assert "no https:// backend" in caught.value.reason
