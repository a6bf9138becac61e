"""The configuration file: reading YAML, expanding ``${VAR}``, and validating it into models."""

from __future__ import annotations

import os
import re
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails
from yaml.constructor import ConstructorError


class ConfigError(Exception):
    """An invalid or unreadable configuration, with a message already formatted for humans.

    ``path`` is the file name (or another source label), ``key`` the key path of the first
    problem (``pools[0].backends[1].url``; ``""`` when it concerns the whole file) and
    ``reason`` what is wrong with it. ``problems`` holds every ``(key, reason)`` found, first
    one first; the message has one line per problem.
    """

    def __init__(
        self, path: str, key: str, reason: str, *, more: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        self.problems: tuple[tuple[str, str], ...] = ((key, reason), *more)
        super().__init__("\n".join(_format_line(path, k, r) for k, r in self.problems))

    @classmethod
    def from_problems(cls, path: str, problems: Sequence[tuple[str, str]]) -> ConfigError:
        """One error reporting every ``(key, reason)`` in ``problems`` (which is not empty)."""
        (key, reason), *more = problems
        return cls(path, key, reason, more=more)


def _format_line(path: str, key: str, reason: str) -> str:
    return f"{path}: {key}: {reason}" if key else f"{path}: {reason}"


_Model = ConfigDict(extra="forbid", frozen=True)


class Listen(BaseModel):
    """Where the proxy accepts client connections."""

    model_config = _Model

    host: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port to listen on.")


class Admin(BaseModel):
    """The admin listener: /metrics, /healthz, /readyz."""

    model_config = _Model

    host: str = Field(default="127.0.0.1", min_length=1, description="Admin listen address.")
    port: int = Field(default=9901, ge=1, le=65535, description="Admin TCP port.")
    enabled: bool = Field(default=True, description="Whether the admin listener runs at all.")


class Timeouts(BaseModel):
    """Upstream timeouts; set globally and optionally overridden per pool."""

    model_config = _Model

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


class Limits(BaseModel):
    """Limits on what clients may send and hold open."""

    model_config = _Model

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
    max_connections: int = Field(
        default=10000, ge=1, description="Most client connections open at once."
    )


class Upstream(BaseModel):
    """Pooling of keep-alive connections to backends."""

    model_config = _Model

    max_idle_per_backend: int = Field(
        default=128, ge=0, description="Pooled keep-alive connections kept per backend."
    )
    idle_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a pooled connection may sit unused before closing."
    )


class Headers(BaseModel):
    """Headers the proxy adds to requests and responses."""

    model_config = _Model

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

    @field_validator("backend_header")
    @classmethod
    def _empty_is_off(cls, value: str | None) -> str | None:
        return value or None


class Shutdown(BaseModel):
    """How the proxy stops: it stops accepting, then lets in-flight requests finish."""

    model_config = _Model

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
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"URL port must be an integer 1..65535 (got {port_text!r})")
    return scheme, parts.hostname, int(port_text)


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendConfig(BaseModel):
    """One upstream server of a pool."""

    model_config = _Model

    url: str = Field(description="Base URL: http(s)://host[:port], no path, query or fragment.")
    weight: int = Field(default=1, ge=1, le=10000, description="Relative share of traffic.")
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


class PoolConfig(BaseModel):
    """A named group of interchangeable backends and the strategy that balances them."""

    model_config = _Model

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


class RouteConfig(BaseModel):
    """Sends matching requests to a pool; routes are tried in order, first match wins."""

    model_config = _Model

    pool: str = Field(description="Name of the pool that serves matching requests.")
    path_prefix: str = Field(default="/", description="Matches paths starting with this.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers that must be present with exactly these values; names ignore case.",
    )
    methods: list[str] | None = Field(
        default=None, min_length=1, description="Methods matched; null matches any."
    )

    @field_validator("path_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        return value

    @field_validator("headers")
    @classmethod
    def _lower_names(cls, value: dict[str, str]) -> dict[str, str]:
        lowered = {name.lower(): v for name, v in value.items()}
        if len(lowered) != len(value):
            raise ValueError("header names differ only by case")
        return lowered

    @field_validator("methods")
    @classmethod
    def _upper_methods(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [m.upper() for m in value]


class Config(BaseModel):
    """The whole configuration file."""

    model_config = _Model

    listen: Listen = Field(default_factory=Listen, description="Client listener.")
    admin: Admin = Field(default_factory=Admin, description="Admin listener.")
    pools: list[PoolConfig] = Field(min_length=1, description="Backend pools.")
    routes: list[RouteConfig] = Field(
        default_factory=list,
        description="Routing rules, first match wins; without routes every request goes to "
        "the first pool.",
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Global upstream timeouts.")
    limits: Limits = Field(default_factory=Limits, description="Client-side limits.")
    upstream: Upstream = Field(default_factory=Upstream, description="Upstream connection pool.")
    headers: Headers = Field(default_factory=Headers, description="Headers the proxy sets.")
    shutdown: Shutdown = Field(default_factory=Shutdown, description="Graceful shutdown.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Logging threshold."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def pool_timeouts(self, pool: PoolConfig) -> Timeouts:
        """The timeouts that apply to ``pool``: the global ones, with any keys the pool sets."""
        if pool.timeouts is None:
            return self.timeouts
        override = {name: getattr(pool.timeouts, name) for name in pool.timeouts.model_fields_set}
        return self.timeouts.model_copy(update=override)


def _cross_checks(config: Config) -> list[tuple[str, str]]:
    """Checks spanning several keys, each problem with the key path it is reported at."""
    problems: list[tuple[str, str]] = []
    pool_names: dict[str, int] = {}
    for i, pool in enumerate(config.pools):
        if pool.name in pool_names:
            problems.append((f"pools[{i}].name", f"duplicate pool name {pool.name!r}"))
        pool_names.setdefault(pool.name, i)
        by_url: dict[tuple[str, str, int], int] = {}
        by_name: dict[str, int] = {}
        for j, backend in enumerate(pool.backends):
            key = f"pools[{i}].backends[{j}]"
            address = backend_address(backend.url)
            name = backend.name or ""
            if address in by_url:
                same = f"same as backends[{by_url[address]}]"
                problems.append((f"{key}.url", f"duplicate backend {backend.url!r} ({same})"))
            elif name in by_name:
                problems.append(
                    (
                        f"{key}.name",
                        f"duplicate backend name {name!r} (same as backends[{by_name[name]}]; "
                        "names default to host:port)",
                    )
                )
            by_url.setdefault(address, j)
            by_name.setdefault(name, j)
    for i, route in enumerate(config.routes):
        if route.pool not in pool_names:
            known = ", ".join(pool_names)
            problems.append((f"routes[{i}].pool", f"no pool named {route.pool!r} (pools: {known})"))
    admin, listen = config.admin, config.listen
    wildcards = ("0.0.0.0", "::")
    if (
        admin.enabled
        and admin.port == listen.port
        and (admin.host == listen.host or admin.host in wildcards or listen.host in wildcards)
    ):
        problems.append(
            (
                "admin.port",
                f"admin listener {host_port(admin.host, admin.port)} clashes with listen "
                f"{host_port(listen.host, listen.port)}",
            )
        )
    return problems


# `$${` is a literal `${`; `${NAME}` or `${NAME:-default}` is a reference; any other `${`
# is malformed.
_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _expand(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        whole, name, default = match.group(0), match.group(1), match.group(2)
        if whole == "$${":
            return "${"
        if name is None:
            raise ValueError("malformed ${...} reference (write $${ for a literal ${)")
        value = os.environ.get(name)
        if default is not None:
            return value or default  # like the shell's ${VAR:-default}: unset or empty
        if value is None:
            raise ValueError(
                f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
            )
        return value

    return _REFERENCE.sub(replace, text)


def _interpolate(node: Any, key: str, source: str) -> Any:
    """A copy of the parsed tree with references expanded in every string value (not keys)."""
    if isinstance(node, str):
        try:
            return _expand(node)
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(key, str(k)), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, _join(key, i), source) for i, v in enumerate(node)]
    return node


def _join(key: str, part: object) -> str:
    if isinstance(part, int):
        return f"{key}[{part}]"
    text = str(part)
    if text.startswith("["):  # pydantic's own markers, such as "[key]"
        return key + text
    return f"{key}.{text}" if key else text


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class found at ``loc`` inside :class:`Config`, if any."""
    annotation: Any = Config
    for part in loc:
        annotation = _strip_optional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        else:
            return None
    annotation = _strip_optional(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


_YAML_TYPE_NAMES: dict[type, str] = {dict: "a mapping", list: "a list"}


def _reason(error: ErrorDetails) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key {loc[-1]!r}{allowed}"
    if kind == "missing":
        return "required key is missing"
    message = {"model_type": "expected a mapping", "dict_type": "expected a mapping"}.get(
        kind, error["msg"]
    )
    value = error.get("input")
    if value is None:
        return f"{message} (got null)"
    if isinstance(value, str | int | float | bool):
        return f"{message} (got {value!r})"
    if kind.endswith("_type"):
        return f"{message} (got {_YAML_TYPE_NAMES.get(type(value), type(value).__name__)})"
    return message


def _translate(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for error in exc.errors(include_url=False):
        key = ""
        for part in error["loc"]:
            key = _join(key, part)
        problems.append((key, _reason(error)))
    return problems


def parse_config(data: object, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML tree into a :class:`Config`.

    Expands ``${VAR}`` and ``${VAR:-default}`` in string values first. Raises
    :class:`ConfigError`, labelled with ``source``, listing every problem found.
    """
    if data is None:
        raise ConfigError(source, "", "file is empty")
    if not isinstance(data, dict):
        got = _YAML_TYPE_NAMES.get(type(data), repr(data))
        raise ConfigError(source, "", f"top level must be a mapping (got {got})")
    expanded = _interpolate(data, "", source)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError.from_problems(source, _translate(exc)) from None
    problems = _cross_checks(config)
    if problems:
        raise ConfigError.from_problems(source, problems)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable; SafeConstructor reports it below
                continue
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, expand and validate the YAML file at ``path``; raises :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"file is not UTF-8 text: {exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid syntax"
        raise ConfigError(source, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from None
    return parse_config(data, source)
