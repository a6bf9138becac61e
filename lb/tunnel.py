"""WebSocket tunnels: which requests are handshakes, and what a tunnel's client side talks to.

A handshake is routed like any request; if the backend answers ``101 Switching Protocols`` the
client connection (:mod:`lb.downstream`) hands its bytes to a :class:`TunnelPeer` (the
attempt's :class:`~lb.exchange.Exchange`), which writes them to the backend and relays the
backend's bytes back.
"""

from __future__ import annotations

from typing import Final, Protocol

from lb.http1 import Headers

# Bytes a client may send after a WebSocket handshake before the backend has answered.
TUNNEL_HOLD_BYTES: Final = 64 << 10


def websocket_upgrade(headers: Headers) -> bytes | None:
    """The ``Upgrade`` value of a WebSocket handshake (``Connection: upgrade`` and ``Upgrade:
    websocket``, RFC 6455 section 4.1), or ``None``."""
    upgrade = None
    connection_upgrade = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"upgrade":
            upgrade = value
        elif lname == b"connection":
            connection_upgrade = connection_upgrade or any(
                token.strip().lower() == b"upgrade" for token in value.split(b",")
            )
    if upgrade is None or not connection_upgrade:
        return None
    return upgrade if upgrade.strip().lower() == b"websocket" else None


class TunnelPeer(Protocol):
    """Where a client connection's bytes go once its WebSocket handshake succeeded."""

    def on_client_data(self, data: bytes) -> None: ...

    def on_client_closed(self) -> None: ...
