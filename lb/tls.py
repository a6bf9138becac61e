"""TLS to backends: one client context per pool, built from its ``tls`` settings.

Every client of a backend (the data plane, health checks, load reports, mirrored copies, the
models list) connects with the same context and server name, so a backend behind a private CA
is checked the same way by all of them.
"""

from __future__ import annotations

import ssl
from typing import Any

from lb.backend import Backend
from lb.config_ops import BackendTLS


def client_context(tls: BackendTLS | None) -> ssl.SSLContext:
    """A context for connecting to backends; raises ``ValueError`` naming a file it cannot load.

    Default: the system's trusted CAs with hostname checks (``ssl.create_default_context``).
    """
    if tls is None:
        return ssl.create_default_context()
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load ca_file {tls.ca_file!r}: {_reason(exc)}") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load cert_file {tls.cert_file!r}"
                + (f" with key_file {tls.key_file!r}" if tls.key_file else "")
                + f": {_reason(exc)}"
            ) from None
    return context


def aiohttp_tls(backend: Backend) -> dict[str, Any]:
    """The keyword arguments that make an aiohttp request check ``backend`` like the proxy."""
    if backend.scheme != "https" or backend.ssl_context is None:
        return {}
    return {"ssl": backend.ssl_context, "server_hostname": backend.server_name}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc)
