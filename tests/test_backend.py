"""A backend's address as the proxy writes it: in Host headers and in URLs to it."""

from __future__ import annotations

import pytest

from lb.backend import Backend


@pytest.mark.parametrize(
    ("url", "authority", "origin"),
    [
        ("http://127.0.0.1:8001", b"127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("https://model.internal", b"model.internal:443", "https://model.internal:443"),
        ("http://[::1]:8002", b"[::1]:8002", "http://[::1]:8002"),
    ],
)
def test_an_ipv6_literal_is_bracketed_in_host_headers_and_urls(
    url: str, authority: bytes, origin: str
) -> None:
    backend = Backend.from_url(url)
    assert backend.authority == authority
    assert backend.origin == origin
