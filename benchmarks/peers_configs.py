"""Configuration files of the proxies ``make bench-peers`` compares, rendered as text.

Every proxy balances round robin over the same backend ports on 127.0.0.1, keeps connections
to the backends alive, logs nothing per request and passes streams through unbuffered, so the
comparison is of the proxies' own cost and not of their defaults' differences.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmarks.processes import HOST

MODEL = "bench-model"  # the model name of the request bodies (benchmarks.wrk.BODY)
NGINX_KEEPALIVE = 128  # idle upstream connections kept by the nginx worker
HAPROXY_TIMEOUT_S = 60


def nginx_conf(port: int, backend_ports: list[int], prefix: Path, user: str | None) -> str:
    """nginx in the foreground with one worker; every path it writes lies under ``prefix``.

    ``user`` sets the worker's user (needed when started as root, whose default ``nobody``
    cannot enter a private temporary directory); ``None`` leaves the directive out.
    ``keepalive_requests`` is raised on both sides so neither wrk's nor the upstream
    connections are recycled every 1,000 requests (nginx's default), which lb does not do.
    """
    servers = "\n".join(f"        server {HOST}:{p};" for p in backend_ports)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user_line = f"user {user};\n" if user else ""
    return f"""{user_line}daemon off;
master_process on;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "nginx-error.log"} warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
{temp_paths}
    keepalive_requests 1000000;

    upstream backends {{
{servers}
        keepalive {NGINX_KEEPALIVE};
        keepalive_requests 1000000;
    }}

    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def haproxy_cfg(port: int, backend_ports: list[int]) -> str:
    """HAProxy in HTTP mode with one thread, round robin, and upstream connections reused.

    No ``log`` line, so nothing is logged per request. ``option http-no-delay`` sends each
    piece of a response as it arrives: by default HAProxy marks body data with ``MSG_MORE``
    while it expects more, and the kernel then holds a small SSE event back for up to 200 ms.
    ``timeout server`` is an inactivity limit, so a stream lives as long as its events come
    less than that apart.
    """
    servers = "\n".join(
        f"    server b{i} {HOST}:{p} maxconn 4096" for i, p in enumerate(backend_ports, start=1)
    )
    return f"""global
    nbthread 1
    maxconn 8192

defaults
    mode http
    option http-keep-alive
    option http-no-delay
    http-reuse always
    timeout connect 5s
    timeout client {HAPROXY_TIMEOUT_S}s
    timeout server {HAPROXY_TIMEOUT_S}s
    timeout http-keep-alive {HAPROXY_TIMEOUT_S}s
    timeout http-request 10s

frontend bench
    bind {HOST}:{port}
    default_backend backends

backend backends
    balance roundrobin
{servers}
"""


def litellm_config(backend_ports: list[int]) -> str:
    """LiteLLM's proxy config: one deployment of ``bench-model`` per backend port.

    Each backend is an OpenAI-compatible ``openai/bench-model`` with a dummy key. No master key
    (so requests need no ``Authorization``, as with the other proxies; LiteLLM insists on
    ``dangerously_permit_weak_or_unset_master_key`` for that), no database, no spend logs,
    no retries, message logging off. LiteLLM's router picks among deployments with its default
    ``simple-shuffle`` (random by weight), the nearest it has to round robin.
    """
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"http://{HOST}:{p}/v1",
                    "api_key": "dummy",
                },
            }
            for p in backend_ports
        ],
        "litellm_settings": {
            "telemetry": False,
            "set_verbose": False,
            "turn_off_message_logging": True,
            "drop_params": True,
            "num_retries": 0,
            "request_timeout": 30,
        },
        "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0},
        "general_settings": {
            "disable_spend_logs": True,
            "disable_error_logs": True,
            "dangerously_permit_weak_or_unset_master_key": True,
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


# Environment of the LiteLLM process: the bundled model price map instead of a download,
# telemetry off, only errors logged.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
}


def lb_config(port: int, admin_port: int, backend_ports: list[int]) -> str:
    """lb with every feature at its defaults (metrics, health checks, admin API on), round
    robin over the backends, and the access log off (the peers log nothing per request)."""
    config = {
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "pools": [
            {
                "name": "chat",
                "strategy": "round_robin",
                "backends": [{"url": f"http://{HOST}:{p}"} for p in backend_ports],
            }
        ],
        "access_log": {"enabled": False},
        "shutdown": {"grace_s": 1},
    }
    return yaml.safe_dump(config, sort_keys=False)
