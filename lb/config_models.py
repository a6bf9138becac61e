"""The configuration's leaf models: listeners, limits, timeouts, backends, pools, routes.

Every model forbids unknown keys and is frozen; every field has a description, which
``lb schema`` publishes. The root model and the file loading live in :mod:`lb.config`.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from lb.config_base import ConfigModel
from lb.config_load_report import LoadReport
from lb.config_ops import BackendTLS, ClientAuth
from lb.config_resilience import Admission, HealthCheck, OutlierDetection, Retry


def _blank_or_control(text: str) -> bool:
    return any(c.isspace() or not c.isprintable() for c in text)


# RFC 9110 section 5.6.2: the characters of a token (a field name, a method).
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def http_token(value: str) -> str:
    """A field name or method as HTTP writes it: one token, no spaces, colons or controls."""
    if not value or not _TCHAR.issuperset(value):
        raise ValueError(
            f"must be an HTTP token: letters, digits and !#$%&'*+-.^_`|~ (got {value!r})"
        )
    return value


def header_text(value: str) -> str:
    """Text written into a header value (a backend's name): no control characters."""
    if not value.isprintable():
        raise ValueError(f"must not contain control characters or line breaks (got {value!r})")
    return value


def listen_host(value: str) -> str:
    """A listener's host as a socket can bind it: an IP address without brackets, or a name."""
    if _blank_or_control(value):
        raise ValueError(f"must not contain spaces or control characters (got {value!r})")
    if value.startswith("[") or value.endswith("]"):
        raise ValueError(f"write an IPv6 address without brackets (got {value!r})")
    if _bad_dotted_quad(value):
        raise ValueError(f"not an IPv4 address (got {value!r})")
    return value


def _bad_dotted_quad(host: str) -> bool:
    """True for a host of dotted digits that is no IPv4 address (``999.1.1.1``): never a
    name, and not what was meant."""
    if not all(part.isdigit() for part in host.split(".")):
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


BindHost = Annotated[str, AfterValidator(listen_host)]


class Listen(ConfigModel):
    """Where the proxy accepts client connections."""

    host: BindHost = Field(default="127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port to listen on.")


class Admin(ConfigModel):
    """The admin listener: /metrics, /healthz, /readyz."""

    host: BindHost = Field(default="127.0.0.1", min_length=1, description="Admin listen address.")
    port: int = Field(default=9901, ge=1, le=65535, description="Admin TCP port.")

    enabled: bool = Field(default=True, description="Whether the admin listener runs at all.")
    token: str | None = Field(
        default=None,
        min_length=1,
        description="Bearer token required by admin calls that change something (also read "
        "from LB_ADMIN_TOKEN). Required when the admin listener is not on loopback.",
    )


class Timeouts(ConfigModel):
    """Upstream timeouts; set globally and optionally overridden per pool."""

    connect_s: float = Field(
        default=5.0, gt=0, description="Seconds allowed to open a connection to a backend."
    )
    response_headers_s: float | None = Field(
        default=600.0,
        gt=0,
        description=(
            "Seconds from request sent to response headers received; for a non-streamed "
            "generation this is the whole generation. null means no limit."
        ),
    )
    idle_s: float | None = Field(
        default=300.0,
        gt=0,
        description=(
            "Longest gap in seconds between two body chunks in either direction once a "
            "response has started; never cuts a stream that is still producing tokens. "
            "null means no limit."
        ),
    )


class Limits(ConfigModel):
    """Limits on what clients may send and hold open."""

    max_body_bytes: int = Field(
        default=33554432, ge=0, description="Largest request body accepted; 413 beyond."
    )
    max_header_bytes: int = Field(
        default=65536, ge=1024, description="Largest request line plus headers; 431 beyond."
    )
    header_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a client has to finish sending request headers."
    )
    keepalive_timeout_s: float = Field(
        default=75.0, gt=0, description="Seconds an idle client connection is kept open."
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest gap between two reads of a request body (nginx's "
        "client_body_timeout); 408 after it.",
    )
    max_connections: int = Field(
        default=10000, ge=1, description="Most client connections open at once."
    )
    max_inspect_bytes: int = Field(
        default=8 << 20,
        ge=1024,
        description="Largest body read whole before routing (model routes, prompt affinity).",
    )


class Upstream(ConfigModel):
    """Pooling of keep-alive connections to backends."""

    max_idle_per_backend: int = Field(
        default=128, ge=0, description="Pooled keep-alive connections kept per backend."
    )
    idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a pooled connection may sit unused before closing (nginx's "
        "upstream keepalive_timeout default); a backend that closes idle connections sooner "
        "is noticed when its close arrives.",
    )


class Headers(ConfigModel):
    """Headers the proxy adds to requests and responses."""

    backend_header: str | None = Field(
        default="x-lb-backend",
        description="Response header naming the backend that served; null or empty turns it off.",
    )
    request_id_header: str = Field(
        default="x-request-id",
        min_length=1,
        description="Request header carrying the request id; generated when absent.",
    )
    forwarded: bool = Field(
        default=True, description="Set X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host."
    )
    decision_header: str | None = Field(
        default="x-lb-decision",
        description="Response header saying which strategy chose the backend and why; "
        "null or empty turns it off.",
    )

    @field_validator("backend_header", "decision_header")
    @classmethod
    def _empty_is_off(cls, value: str | None) -> str | None:
        return http_token(value) if value else None

    @field_validator("request_id_header")
    @classmethod
    def _token(cls, value: str) -> str:
        return http_token(value)


class Shutdown(ConfigModel):
    """How the proxy stops: it stops accepting, then lets in-flight requests finish."""

    grace_s: float = Field(
        default=30.0, ge=0, description="Seconds in-flight requests get to finish on shutdown."
    )


def backend_address(url: str) -> tuple[str, str, int]:
    """Split a backend URL into ``(scheme, host, port)``, the port defaulting by scheme.

    Raises ``ValueError`` with a human-readable reason when the URL is not
    ``http(s)://host[:port][/]``.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"URL must start with http:// or https:// (got {url!r})")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError("URL must not contain user credentials")
    if not parts.hostname:
        raise ValueError(f"URL has no host (got {url!r})")
    if _blank_or_control(parts.netloc):
        raise ValueError(f"URL host must not contain spaces or control characters (got {url!r})")
    if _bad_dotted_quad(parts.hostname):
        raise ValueError(f"URL host is not an IPv4 address (got {url!r})")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"URL must not have a path (got {parts.path!r}); match paths with routes[].path_prefix"
        )
    if parts.query or url.endswith("?"):
        raise ValueError("URL must not have a query string")
    if parts.fragment or "#" in url:
        raise ValueError("URL must not have a fragment")
    scheme = parts.scheme.lower()
    hostinfo = parts.netloc.rpartition("]")[2] if parts.netloc.startswith("[") else parts.netloc
    _, colon, port_text = hostinfo.rpartition(":")
    if not colon or port_text == "":
        return scheme, parts.hostname, 443 if scheme == "https" else 80
    # ASCII digits only: str.isdigit() also accepts other scripts' digits ('٨٠'), which
    # urllib's port parsing (used to connect) refuses.
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"URL port must be an integer 1..65535 (got {port_text!r})")
    return scheme, parts.hostname, int(port_text)


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendConfig(ConfigModel):
    """One upstream server of a pool."""

    url: str = Field(description="Base URL: http(s)://host[:port], no path, query or fragment.")
    weight: int = Field(default=1, ge=1, le=10000, description="Relative share of traffic.")
    max_concurrency: int | None = Field(
        default=None, ge=1, description="Overrides the pool's admission.max_concurrency."
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        description="Name used in logs, metrics and the backend header; defaults to host:port.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        # Done before validation because the models are frozen; a bad URL is left for the
        # field validator to report.
        if isinstance(data, dict) and data.get("name") is None and isinstance(data.get("url"), str):
            try:
                _, host, port = backend_address(data["url"])
            except ValueError:
                return data
            return {**data, "name": host_port(host, port)}
        return data

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        backend_address(value)
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else header_text(value)  # written in the backend header


class PoolConfig(ConfigModel):
    """A named group of interchangeable backends and the strategy that balances them."""

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Pool name."
    )
    strategy: str = Field(
        default="round_robin", min_length=1, description="Balancing strategy (registry key)."
    )
    strategy_options: dict[str, Any] = Field(
        default_factory=dict, description="Options passed to the strategy."
    )
    backends: list[BackendConfig] = Field(min_length=1, description="The pool's backends.")
    timeouts: Timeouts | None = Field(
        default=None, description="Overrides of the global timeouts for this pool."
    )
    health_check: HealthCheck = Field(default_factory=HealthCheck, description="Active checks.")
    outlier_detection: OutlierDetection = Field(
        default_factory=OutlierDetection, description="Passive ejection on failures."
    )
    retry: Retry = Field(default_factory=Retry, description="Retries of failed attempts.")
    admission: Admission = Field(
        default_factory=Admission, description="Per-backend concurrency limit and queue."
    )
    panic_threshold_percent: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="Below this share of available backends, balance over all of them.",
    )
    slow_start_s: float = Field(
        default=0.0, ge=0, description="A backend that comes back ramps its weight up over this."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models this pool serves, for GET /v1/models; empty: ask the backends.",
    )
    load_report: LoadReport = Field(
        default_factory=LoadReport,
        description="Scrape the backends' own /metrics for the load they report.",
    )
    shadow_strategy: str | None = Field(
        default=None,
        description="A strategy computed beside the real one, to count how often they agree.",
    )
    tls: BackendTLS | None = Field(
        default=None,
        description="Certificate checks for the pool's https:// backends (CA file, client "
        "certificate, server name); default: verify against the system's CAs.",
    )


class SplitTarget(ConfigModel):
    """One pool of a traffic split and its share."""

    pool: str = Field(description="Pool name.")
    weight: int = Field(ge=0, le=10000, description="Relative share of the route's requests.")


class Mirror(ConfigModel):
    """A shadow pool that gets a copy of a share of a route's requests."""

    pool: str = Field(description="The shadow pool; its answers are read and dropped.")
    percent: float = Field(
        default=100.0, gt=0, le=100, description="Share of requests copied, in percent."
    )


class RouteConfig(ConfigModel):
    """Sends matching requests to a pool; routes are tried in order, first match wins."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="Its name in the access log, metrics and admin API; default route-<index>.",
    )
    pool: str | None = Field(
        default=None, description="Name of the pool that serves matching requests."
    )
    split: list[SplitTarget] | None = Field(
        default=None,
        min_length=1,
        description="Instead of `pool`: share requests between pools by weight (a canary).",
    )
    mirror: Mirror | None = Field(
        default=None, description="Copy a share of requests to a shadow pool."
    )
    path_prefix: str = Field(default="/", description="Matches paths starting with this.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers that must be present with exactly these values; names ignore case.",
    )
    methods: list[str] | None = Field(
        default=None, min_length=1, description="Methods matched; null matches any."
    )
    retry: Retry | None = Field(
        default=None, description="Overrides the pool's retry settings for this route."
    )
    auth: ClientAuth | None = Field(
        default=None, description="Client API keys this route requires."
    )
    model: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Matches requests whose JSON body names one of these models.",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _one_model(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _pool_or_split(self) -> RouteConfig:
        if (self.pool is None) == (self.split is None):
            raise ValueError("a route needs exactly one of `pool` or `split`")
        if self.split is not None and not any(t.weight for t in self.split):
            raise ValueError("split weights are all 0")
        return self

    def pools(self) -> list[str]:
        """Every pool this route sends to (primary, split and mirror)."""
        names = [self.pool] if self.pool is not None else [t.pool for t in self.split or []]
        if self.mirror is not None:
            names.append(self.mirror.pool)
        return names

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @field_validator("headers")
    @classmethod
    def _lower_names(cls, value: dict[str, str]) -> dict[str, str]:
        lowered = {http_token(name).lower(): v for name, v in value.items()}
        if len(lowered) != len(value):
            raise ValueError("header names differ only by case")
        return lowered

    @field_validator("methods")
    @classmethod
    def _upper_methods(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [http_token(m).upper() for m in value]
