"""The ``lb`` command line: run the proxy, check a configuration file, print its schema."""

from __future__ import annotations

import argparse
import json
import os
import sys

from lb.config import (
    MAX_WORKERS,
    Config,
    ConfigError,
    RouteConfig,
    host_port,
    load_config,
    route_name,
)

DEFAULT_CONFIG = "config.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_CONFIG_ERROR = 2


def check_buildable(config: Config, source: str) -> None:
    """Build the pools once, as start-up would, so that strategies and their options are
    checked too; raises :class:`ConfigError` with the key path of each problem.

    ``lb.config`` cannot do this itself: the strategy registry sits above it.
    """
    from lb.build import build_pools  # late: only what is needed to build, nothing runs

    for pool in build_pools(config, source).values():
        pool.close()


def summary(config: Config, source: str) -> str:
    """What ``lb check`` prints for a valid file: listeners, pools with backends, routes."""
    listen = host_port(config.listen.host, config.listen.port)
    admin = host_port(config.admin.host, config.admin.port) if config.admin.enabled else None
    lines = [f"{source}: OK", f"listen {listen}, " + (f"admin {admin}" if admin else "no admin")]
    for pool in config.pools:
        count = len(pool.backends)
        plural = "" if count == 1 else "s"
        lines.append(f"pool {pool.name} ({pool.strategy}): {count} backend{plural}")
        width = max(len(backend.name or "") for backend in pool.backends)
        for backend in pool.backends:
            name = (backend.name or "").ljust(width)
            lines.append(f"  {name}  {backend.url}  weight {backend.weight}")
    for i, route in enumerate(config.routes):
        lines.append(f"route {route_name(route.name, i)}: {_describe(route)} -> {_target(route)}")
    if not config.routes:
        lines.append(f"no routes: every request goes to pool {config.pools[0].name}")
    if config.workers != 1:
        lines.append(f"workers: {config.workers or 'one per CPU'}")
    return "\n".join(lines)


def _describe(route: RouteConfig) -> str:
    parts = [",".join(route.methods)] if route.methods else []
    parts.append(route.path_prefix)
    parts.extend(f"{name}={value}" for name, value in route.headers.items())
    if route.model:
        parts.append("model=" + ",".join(route.model))
    return " ".join(parts)


def _target(route: RouteConfig) -> str:
    """Where a route sends: its pool, or its split's pools with their weights; its mirror."""
    if route.split is not None:
        text = " ".join(f"{t.pool}:{t.weight}" for t in route.split)
    else:
        text = str(route.pool)
    if route.mirror is not None:
        text += f" (mirror {route.mirror.pool} {route.mirror.percent:g}%)"
    return text


def _parser() -> argparse.ArgumentParser:
    # Options live on both the main parser and the subcommands; SUPPRESS keeps a subcommand's
    # absent option from overwriting one given before the subcommand name.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"configuration file (default: $LB_CONFIG, else {DEFAULT_CONFIG})",
    )
    run_options = argparse.ArgumentParser(add_help=False)
    run_options.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="override log_level from the configuration file",
    )
    run_options.add_argument(
        "--workers",
        metavar="N",
        type=_workers,
        default=argparse.SUPPRESS,
        help='processes serving the listener; 0 or "auto": one per CPU '
        "(overrides workers from the configuration file)",
    )
    # Set by the supervisor on the processes it starts (lb.workers); not for people.
    for name in ("--worker-index", "--worker-fd"):
        run_options.add_argument(name, type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="lb",
        description="Load-balancing reverse proxy for AI model servers.",
        parents=[config_option, run_options],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "run", parents=[config_option, run_options], help="run the proxy (the default)"
    )
    commands.add_parser(
        "check", parents=[config_option], help="validate a configuration file and summarise it"
    )
    commands.add_parser("schema", help="print the configuration's JSON schema")
    return parser


def _workers(text: str) -> int:
    """``--workers``: a count, 0 or ``auto`` (both: one per CPU)."""
    if text == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0 or count > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f'expected a number from 0 to {MAX_WORKERS} or "auto", got {text!r}'
        )
    return count


def _run(config: Config, config_path: str, args: argparse.Namespace) -> int:
    log_level: str | None = getattr(args, "log_level", None)
    if log_level is not None:
        config = config.model_copy(update={"log_level": log_level})
    # late imports: lb.app sits at the top of the package and pulls in everything
    index: int | None = getattr(args, "worker_index", None)
    fd: int | None = getattr(args, "worker_fd", None)
    try:
        if index is not None and fd is not None:
            from lb import app
            from lb.worker_link import WorkerLink

            return app.run(
                config, config_path, WorkerLink(index, fd), level_pinned=log_level is not None
            )
        from lb.workers import supervise, worker_count

        count = worker_count(getattr(args, "workers", config.workers))
        if count > 1:
            return supervise(config, config_path, count, log_level)
        from lb import app

        return app.run(config, config_path, level_pinned=log_level is not None)
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Exit code 2 means the configuration is invalid; the reason is printed to stderr.
    """
    args = _parser().parse_args(argv)
    command: str = args.command or "run"
    if command == "schema":
        print(json.dumps(Config.model_json_schema(), indent=2))
        return 0
    named: str | None = getattr(args, "config", None)
    if named is None:
        named = os.environ.get("LB_CONFIG")
    if named == "":
        # An unset variable in a script (--config "$FILE"): not a reason to run another file.
        print("lb: the configuration file named is empty (--config or $LB_CONFIG)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    config_path = named or DEFAULT_CONFIG
    try:
        config = load_config(config_path)
        check_buildable(config, config_path)
        if command == "check":
            print(summary(config, config_path))
            return 0
        return _run(config, config_path, args)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"lb: {line}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
