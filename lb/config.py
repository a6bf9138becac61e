"""The configuration file: reading YAML, expanding ``${VAR}``, and validating it into models."""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import ErrorDetails

from lb.config_base import ConfigModel, strip_optional
from lb.config_models import (
    Admin,
    BackendConfig,
    Headers,
    Limits,
    Listen,
    PoolConfig,
    RouteConfig,
    Shutdown,
    Timeouts,
    Upstream,
    backend_address,
    host_port,
)
from lb.config_ops import LOOPBACK_HOSTS, AccessLog, ClientAuth
from lb.config_yaml import expand, read_yaml

__all__ = [
    "AccessLog",
    "Admin",
    "BackendConfig",
    "Config",
    "ConfigError",
    "Headers",
    "Limits",
    "Listen",
    "PoolConfig",
    "RouteConfig",
    "Shutdown",
    "Timeouts",
    "Upstream",
    "backend_address",
    "host_port",
    "load_config",
    "parse_config",
]


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


# More worker processes than any machine has cores: a typo, which would start them all.
MAX_WORKERS: Final = 1024


# Top-level keys of this prefix are the file's own (anchors for YAML merge keys, notes), as
# Docker Compose's extension fields: they are not read.
EXTENSION_PREFIX: Final = "x-"


class Config(ConfigModel):
    """The whole configuration file."""

    model_config = ConfigDict(json_schema_extra={"patternProperties": {f"^{EXTENSION_PREFIX}": {}}})

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
    access_log: AccessLog = Field(
        default_factory=AccessLog, description="Structured access log on standard output."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Logging threshold."
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="Operational log lines on stderr: JSON objects or text."
    )
    workers: Annotated[
        int, WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"const": "auto"}]})
    ] = Field(
        default=1,
        ge=0,
        le=MAX_WORKERS,
        description="Processes serving the client listener, each with its own event loop "
        '(SO_REUSEPORT spreads connections); 1 is a single process, 0 or "auto" one per '
        "CPU the process may run on. The command line's --workers overrides it.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: Any) -> Any:
        if value == "auto":
            return 0  # resolved to the CPU count when the proxy starts
        if isinstance(value, bool) or (isinstance(value, str) and not value.isdigit()):
            raise ValueError(f'expected a number of workers or "auto" (got {value!r})')
        return value

    def pool_timeouts(self, pool: PoolConfig) -> Timeouts:
        """The timeouts that apply to ``pool``: the global ones, with any keys the pool sets."""
        if pool.timeouts is None:
            return self.timeouts
        override = {name: getattr(pool.timeouts, name) for name in pool.timeouts.model_fields_set}
        return self.timeouts.model_copy(update=override)


def route_name(name: str | None, index: int) -> str:
    """A route's name: the configured one, else ``route-<index>``."""
    return name if name is not None else f"route-{index}"


def admin_token(config: Config) -> str | None:
    """The admin bearer token: ``admin.token``, else ``$LB_ADMIN_TOKEN``, else ``None``.

    Surrounding whitespace is dropped (a token file's final newline): a header's value has
    none, so a token keeping it could never match. Whitespace alone is no token."""
    token = config.admin.token or os.environ.get("LB_ADMIN_TOKEN") or ""
    return token.strip() or None


def client_api_keys(auth: ClientAuth) -> frozenset[str]:
    """Every key a route accepts: ``api_keys`` plus those in ``$api_keys_env``."""
    keys = {k.strip() for k in auth.api_keys}
    if auth.api_keys_env:
        keys.update(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(","))
    keys.discard("")
    return frozenset(keys)


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
        age = pool.strategy_options.get("max_age_s")
        report = pool.load_report
        if (
            report.enabled
            and isinstance(age, int | float)
            and not isinstance(age, bool)
            and 0 < age <= report.interval_s
        ):
            problems.append(
                (
                    f"pools[{i}].strategy_options.max_age_s",
                    f"{age:g} is not longer than load_report.interval_s ({report.interval_s:g}): "
                    "reports would go stale between scrapes",
                )
            )
        if pool.tls is not None and not any(
            b.url.lower().startswith("https://") for b in pool.backends
        ):
            problems.append(
                (
                    f"pools[{i}].tls",
                    "TLS settings for a pool with no https:// backend (its backends would be "
                    "reached in plain text)",
                )
            )
    known = ", ".join(pool_names)
    route_names: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        name = route_name(route.name, i)
        if name in route_names:
            problems.append(
                (f"routes[{i}].name", f"duplicate route name {name!r} (same as routes"
                 f"[{route_names[name]}]; unnamed routes are route-<index>)")
            )  # fmt: skip
        route_names.setdefault(name, i)
        where = [("pool", route.pool)] if route.pool is not None else []
        where += [(f"split[{j}].pool", t.pool) for j, t in enumerate(route.split or [])]
        if route.mirror is not None:
            where.append(("mirror.pool", route.mirror.pool))
        for key, name in where:
            if name not in pool_names:
                problems.append((f"routes[{i}].{key}", f"no pool named {name!r} (pools: {known})"))
    for i, pool in enumerate(config.pools):
        for key, strategy in (
            ("strategy", pool.strategy),
            ("shadow_strategy", pool.shadow_strategy),
        ):
            if strategy == "least_loaded" and not pool.load_report.enabled:
                problems.append(
                    (
                        f"pools[{i}].load_report.enabled",
                        f"least_loaded ({key}) needs the backends' reported load: "
                        "set load_report.enabled",
                    )
                )
    admin, listen = config.admin, config.listen
    if admin.enabled and admin.host not in LOOPBACK_HOSTS and not admin_token(config):
        problems.append(
            (
                "admin.token",
                f"required when the admin listener is not on loopback (admin.host is "
                f"{admin.host!r}): set admin.token or the LB_ADMIN_TOKEN environment variable",
            )
        )
    for i, route in enumerate(config.routes):
        if route.auth is not None and not client_api_keys(route.auth):
            problems.append(
                (f"routes[{i}].auth", "no API keys: set api_keys or a non-empty api_keys_env")
            )
    wildcards = ("0.0.0.0", "::")
    aliases = {"localhost": "127.0.0.1"}  # the name binds the loopback address
    admin_host = aliases.get(admin.host, admin.host)
    listen_host = aliases.get(listen.host, listen.host)
    if (
        admin.enabled
        and admin.port == listen.port
        and (admin_host == listen_host or admin_host in wildcards or listen_host in wildcards)
    ):
        problems.append(
            (
                "admin.port",
                f"admin listener {host_port(admin.host, admin.port)} clashes with listen "
                f"{host_port(listen.host, listen.port)}",
            )
        )
    return problems


def _interpolate(node: Any, key: str, source: str) -> Any:
    """A copy of the parsed tree with references expanded in every string value (not keys)."""
    if isinstance(node, str):
        try:
            return expand(node)
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


def _walk(loc: Sequence[int | str]) -> tuple[str, Any, bool]:
    """Follow an error's location through :class:`Config`: its key path without pydantic's
    union-branch tags (``literal[...]``, ``int``), the annotation found there (``None`` once
    it cannot be told), and whether a branch tag was passed."""
    key, branch = "", False
    annotation: Any = Config
    for part in loc:
        annotation = strip_optional(annotation)
        if get_origin(annotation) is Annotated:
            annotation = strip_optional(get_args(annotation)[0])
        if get_origin(annotation) in (Union, types.UnionType):
            branch, annotation = True, None  # this part names the branch tried
            continue
        key = _join(key, part)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            annotation = None if field is None else field.annotation
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            annotation = None
    return key, strip_optional(annotation), branch


def _model_at(loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class found at ``loc`` inside :class:`Config`, if any."""
    _, annotation, _ = _walk(loc)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


_YAML_TYPE_NAMES: dict[type, str] = {dict: "a mapping", list: "a list"}


def _message(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "value_error" and "ctx" in error:
        return str(error["ctx"]["error"])
    if kind == "extra_forbidden":
        loc = error["loc"]
        model = _model_at(loc[:-1])
        allowed = f" (allowed: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key {loc[-1]!r}{allowed}"
    if kind == "missing":
        return "required key is missing"
    return {"model_type": "expected a mapping", "dict_type": "expected a mapping"}.get(
        kind, error["msg"]
    )


def _reason(error: ErrorDetails, message: str | None = None) -> str:
    """``message`` (the error's own by default) with the value given, where that helps."""
    kind = error["type"]
    if message is None:
        message = _message(error)
        if (kind == "value_error" and "ctx" in error) or kind in ("extra_forbidden", "missing"):
            return message
    value = error.get("input")
    if value is None:
        return f"{message} (got null)"
    if isinstance(value, str | int | float | bool):
        return f"{message} (got {value!r})"
    if kind.endswith("_type") or isinstance(value, dict | list):
        return f"{message} (got {_YAML_TYPE_NAMES.get(type(value), type(value).__name__)})"
    return message


def _expected(error: ErrorDetails) -> str:
    """What one branch of a union wanted, as the end of "expected ..."."""
    text = _message(error).removeprefix("Input should be ").removeprefix("expected ")
    return text.split(", unable to ")[0].split(", got ")[0]


def _translate(exc: ValidationError) -> list[tuple[str, str]]:
    """One ``(key, reason)`` per problem. A value no branch of a union took is one problem:
    "expected A or B (got ...)", not one line per branch under pydantic's tags."""
    problems: list[tuple[str, str]] = []
    branches: dict[str, list[ErrorDetails]] = {}
    for error in exc.errors(include_url=False):
        key, _, branch = _walk(error["loc"])
        if branch:
            tried = branches.get(key)
            if tried is None:
                tried = branches[key] = []
                problems.append((key, ""))  # filled in below, in the order met
            tried.append(error)
        else:
            problems.append((key, _reason(error)))
    for index, (key, reason) in enumerate(problems):
        tried = branches.get(key) if not reason else None
        if tried:
            if len(tried) == 1:
                problems[index] = (key, _reason(tried[0]))
            else:
                wanted = " or ".join(_expected(error) for error in tried)
                problems[index] = (key, _reason(tried[0], f"expected {wanted}"))
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
    data = {
        key: value
        for key, value in data.items()
        if not (isinstance(key, str) and key.startswith(EXTENSION_PREFIX))
    }
    expanded = _interpolate(data, "", source)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError.from_problems(source, _translate(exc)) from None
    problems = _cross_checks(config)
    if problems:
        raise ConfigError.from_problems(source, problems)
    return config


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
        data = read_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid syntax"
        raise ConfigError(source, "", f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"invalid YAML: {exc}") from None
    return parse_config(data, source)
