"""Turns a validated :class:`~lb.config.Config` into the live objects the data plane runs on.

Start-up and reload both come through here, so a configuration that builds here will serve.
Problems only found while building (a strategy that cannot be loaded or rejects its options)
are raised as :class:`~lb.config.ConfigError` with the key path, like any other config error.
"""

from __future__ import annotations

from collections.abc import Mapping

from lb.admission import AdmissionQueue
from lb.backend import Backend, decay_seconds
from lb.client_auth import ClientKeys
from lb.config import Config, ConfigError, client_api_keys, route_name
from lb.forwarding import ForwardingSettings
from lb.outlier import OutlierDetector
from lb.pool import Pool, PoolTimeouts
from lb.request import ListenerLimits
from lb.retry import RetryPolicy
from lb.router import Route, Router
from lb.strategies import build as build_strategy
from lb.tls import client_context
from lb.upstream import ConnectionPool


def build_pools(
    config: Config,
    source: str = "<config>",
    previous: Mapping[str, Pool] | None = None,
) -> dict[str, Pool]:
    """One :class:`Pool` per configured pool, in file order.

    With ``previous`` (a reload), a backend that stays (same pool, URL and name) keeps its
    state: the same :class:`Backend` object (health, in-flight, latency estimate, counters)
    and its pooled connections; a pool that stays keeps its counters. New backends start as
    at start-up, ramping up if the pool has slow start.
    """
    pools: dict[str, Pool] = {}
    problems: list[tuple[str, str]] = []
    for i, pc in enumerate(config.pools):
        prev = previous.get(pc.name) if previous else None
        kept = {(b.url, b.name): b for b in prev.backends} if prev else {}
        pool_limit = pc.admission.max_concurrency
        context = None
        if any(bc.url.lower().startswith("https://") for bc in pc.backends):
            try:
                context = client_context(pc.tls)
            except ValueError as exc:
                problems.append((f"pools[{i}].tls", str(exc)))
                continue
        backends: list[Backend] = []
        fresh: list[Backend] = []
        for bc in pc.backends:
            backend = kept.get((bc.url, bc.name or ""))
            if backend is None:
                backend = Backend.from_url(bc.url, weight=bc.weight, name=bc.name)
                if pc.health_check.enabled and pc.health_check.initial_state == "unhealthy":
                    backend.healthy = False
                    backend.awaiting_check = True
                fresh.append(backend)
            if not pc.health_check.enabled:
                backend.healthy = True  # no check will ever pass it again: a reload turned them off
                backend.awaiting_check = False
            backend.weight = bc.weight
            backend.ssl_context = context if backend.scheme == "https" else None
            backend.server_name = pc.tls.server_name if pc.tls is not None else None
            backend.effective_weight = float(bc.weight)
            backend.max_concurrency = bc.max_concurrency or pool_limit
            backends.append(backend)
        # The latency estimate's decay is the pool's, whatever the strategy (a user class
        # receives its options unchecked): a bad one would fail every request later on.
        try:
            decay_s = decay_seconds(pc.strategy_options)
        except ValueError as exc:
            problems.append((f"pools[{i}].strategy_options.decay_s", str(exc)))
            continue
        options = dict(pc.strategy_options)
        if pc.strategy in ("least_loaded", "cache_aware"):
            options.setdefault("max_age_s", pc.load_report.max_age_s)
        # The same spec and options over the very same backends and weights: the strategy
        # that ran keeps running, so a reload does not scatter prompts from their caches.
        members = tuple((id(b), b.weight) for b in backends)
        strategy_key = (pc.strategy, repr(sorted(options.items())), members)
        shadow_key = (pc.shadow_strategy, members)
        if prev is not None and prev.strategy_key == strategy_key:
            strategy = prev.strategy
        else:
            try:
                strategy = build_strategy(pc.strategy, backends, options=options)
            except ValueError as exc:
                problems.append((f"pools[{i}].strategy", str(exc)))
                continue
        shadow = None
        if pc.shadow_strategy is not None:
            if prev is not None and prev.shadow_key == shadow_key:
                shadow = prev.shadow_strategy
            else:
                try:
                    shadow = build_strategy(pc.shadow_strategy, backends)
                except ValueError as exc:
                    problems.append((f"pools[{i}].shadow_strategy", str(exc)))
                    continue
        upstreams = {
            b: prev.upstreams[b]
            if prev is not None and b in prev.upstreams
            else ConnectionPool(
                b,
                max_idle=config.upstream.max_idle_per_backend,
                idle_timeout_s=config.upstream.idle_timeout_s,
            )
            for b in backends
        }
        t = config.pool_timeouts(pc)
        pool = Pool(
            pc.name,
            backends,
            strategy,
            upstreams,
            PoolTimeouts(t.connect_s, t.response_headers_s, t.idle_s),
            rtt_decay_s=decay_s,
            retry=RetryPolicy.from_config(pc.retry),
            outliers=OutlierDetector(pc.outlier_detection),
            queue=AdmissionQueue(
                max_queue=pc.admission.max_queue,
                timeout_s=pc.admission.queue_timeout_s,
                reject_status=pc.admission.reject_status,
                retry_after_s=pc.admission.retry_after_s,
            ),
            panic_threshold=pc.panic_threshold_percent / 100.0,
            slow_start_s=pc.slow_start_s,
            stats=prev.stats if prev is not None else None,
            shadow_strategy=shadow,
        )
        if prev is not None:
            if prev.queue is not None and pool.queue is not None:
                pool.queue.carry_counters(prev.queue)
            for backend in fresh:
                pool.begin_slow_start(backend)
        pool.strategy_key, pool.shadow_key = strategy_key, shadow_key
        header = config.headers.backend_header
        pool.backend_lines = {
            b: (b"%s: %s\r\n" % (header.encode(), b.name.encode()) if header else b"")
            for b in backends
        }
        pools[pc.name] = pool
    if problems:
        for pool in pools.values():
            pool.retire(keep=_all_backends(previous))
        raise ConfigError.from_problems(source, problems)
    return pools


def _all_backends(pools: Mapping[str, Pool] | None) -> set[Backend]:
    return {b for pool in (pools or {}).values() for b in pool.backends}


def retire_pools(old: Mapping[str, Pool], new: Mapping[str, Pool]) -> None:
    """After a reload: stop the old pools, closing connections of backends that left; each
    learns its successor, where attempts begun before the reload end."""
    keep = _all_backends(new)
    for pool in old.values():
        pool.successor = new.get(pool.name)
        pool.retire(keep=keep)


# What building a pool writes on a backend a reload keeps: put back if the reload is refused.
_BUILT_FIELDS = (
    "healthy",
    "awaiting_check",
    "available",
    "weight",
    "effective_weight",
    "max_concurrency",
    "ssl_context",
    "server_name",
    "pool_load",
)

BackendState = list[tuple[Backend, tuple[object, ...]]]


def save_backends(pools: Mapping[str, Pool]) -> BackendState:
    """The fields a build may change on the running pools' backends (see restore_backends)."""
    return [(b, tuple(getattr(b, name) for name in _BUILT_FIELDS)) for b in _all_backends(pools)]


def restore_backends(saved: BackendState) -> None:
    """Undo what a refused reload's build wrote on backends the running config still uses."""
    for backend, values in saved:
        for name, value in zip(_BUILT_FIELDS, values, strict=True):
            setattr(backend, name, value)


def build_router(config: Config, pools: dict[str, Pool]) -> Router:
    routes = []
    for i, rc in enumerate(config.routes):
        split = tuple((pools[t.pool], t.weight) for t in rc.split or [])
        primary = pools[rc.pool] if rc.pool is not None else split[0][0]
        routes.append(
            Route(
                pool=primary,
                name=route_name(rc.name, i),
                path_prefix=rc.path_prefix.encode(),
                headers=tuple((k.encode(), v.encode()) for k, v in rc.headers.items()),
                methods=frozenset(m.encode() for m in rc.methods) if rc.methods else None,
                retry=RetryPolicy.from_config(rc.retry) if rc.retry is not None else None,
                auth=ClientKeys(client_api_keys(rc.auth), forward_key=rc.auth.forward_key)
                if rc.auth is not None
                else None,
                models=frozenset(rc.model) if rc.model is not None else None,
                split=split,
                mirror=pools[rc.mirror.pool] if rc.mirror is not None else None,
                mirror_share=rc.mirror.percent / 100.0 if rc.mirror is not None else 0.0,
            )
        )
    return Router(routes, default=pools[config.pools[0].name])


def configured_models(config: Config) -> dict[str, list[str]]:
    """The models each pool serves by the configuration: its ``models`` and route matchers."""
    models: dict[str, list[str]] = {p.name: list(p.models) for p in config.pools}
    for route in config.routes:
        targets = [route.pool] if route.pool is not None else [t.pool for t in route.split or []]
        for name in targets:
            for model in route.model or []:
                if model not in models[name]:
                    models[name].append(model)
    return models


def replay_bytes(config: Config) -> int:
    """Bodies up to this size are kept for replay: the largest any pool or route may retry.

    The body starts arriving before its route is known, so the largest limit applies; each
    retry still checks its own policy's ``replay_max_bytes``.
    """
    sizes = [p.retry.replay_max_bytes for p in config.pools]
    sizes += [r.retry.replay_max_bytes for r in config.routes if r.retry is not None]
    return max(sizes)


def listener_limits(config: Config) -> ListenerLimits:
    lim = config.limits
    return ListenerLimits(
        max_header_bytes=lim.max_header_bytes,
        max_body_bytes=lim.max_body_bytes,
        header_timeout_s=lim.header_timeout_s,
        keepalive_timeout_s=lim.keepalive_timeout_s,
        body_timeout_s=lim.body_timeout_s,
        replay_bytes=replay_bytes(config),
        max_connections=lim.max_connections,
        max_inspect_bytes=lim.max_inspect_bytes,
        request_id_header=config.headers.request_id_header.lower().encode(),
    )


def forwarding_settings(config: Config) -> ForwardingSettings:
    h = config.headers
    return ForwardingSettings(
        backend_header=h.backend_header.lower().encode() if h.backend_header else None,
        request_id_header=h.request_id_header.lower().encode(),
        forwarded=h.forwarded,
        decision_header=h.decision_header.lower().encode() if h.decision_header else None,
    )
