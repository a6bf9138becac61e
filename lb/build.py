"""Turns a validated :class:`~lb.config.Config` into the live objects the data plane runs on.

Start-up and reload both come through here, so a configuration that builds here will serve.
Problems only found while building (a strategy that cannot be loaded or rejects its options)
are raised as :class:`~lb.config.ConfigError` with the key path, like any other config error.
"""

from __future__ import annotations

from lb.backend import DEFAULT_DECAY_S, Backend
from lb.config import Config, ConfigError
from lb.downstream import ListenerLimits
from lb.forwarding import ForwardingSettings
from lb.pool import Pool, PoolTimeouts
from lb.router import Route, Router
from lb.strategies import build as build_strategy
from lb.upstream import ConnectionPool

# Bodies up to this size are kept so a request can be replayed on another connection.
REPLAY_BYTES = 1 << 20


def build_pools(config: Config, source: str = "<config>") -> dict[str, Pool]:
    """One :class:`Pool` per configured pool, in file order."""
    pools: dict[str, Pool] = {}
    problems: list[tuple[str, str]] = []
    for i, pc in enumerate(config.pools):
        backends = [Backend.from_url(b.url, weight=b.weight, name=b.name) for b in pc.backends]
        try:
            strategy = build_strategy(pc.strategy, backends, options=pc.strategy_options)
        except ValueError as exc:
            problems.append((f"pools[{i}].strategy", str(exc)))
            continue
        upstreams = {
            b: ConnectionPool(
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
            rtt_decay_s=float(pc.strategy_options.get("decay_s", DEFAULT_DECAY_S)),
        )
        header = config.headers.backend_header
        pool.backend_lines = {
            b: (b"%s: %s\r\n" % (header.encode(), b.name.encode()) if header else b"")
            for b in backends
        }
        pools[pc.name] = pool
    if problems:
        for pool in pools.values():
            pool.close()
        raise ConfigError.from_problems(source, problems)
    return pools


def build_router(config: Config, pools: dict[str, Pool]) -> Router:
    routes = [
        Route(
            pool=pools[rc.pool],
            path_prefix=rc.path_prefix.encode(),
            headers=tuple((k.encode(), v.encode()) for k, v in rc.headers.items()),
            methods=frozenset(m.encode() for m in rc.methods) if rc.methods else None,
        )
        for rc in config.routes
    ]
    return Router(routes, default=pools[config.pools[0].name])


def listener_limits(config: Config) -> ListenerLimits:
    lim = config.limits
    return ListenerLimits(
        max_header_bytes=lim.max_header_bytes,
        max_body_bytes=lim.max_body_bytes,
        header_timeout_s=lim.header_timeout_s,
        keepalive_timeout_s=lim.keepalive_timeout_s,
        replay_bytes=REPLAY_BYTES,
        max_connections=lim.max_connections,
        request_id_header=config.headers.request_id_header.lower().encode(),
    )


def forwarding_settings(config: Config) -> ForwardingSettings:
    h = config.headers
    return ForwardingSettings(
        backend_header=h.backend_header.lower().encode() if h.backend_header else None,
        request_id_header=h.request_id_header.lower().encode(),
        forwarded=h.forwarded,
    )
