"""Command-line flags of ``python -m backends.sim``, and the ``start_sim`` knobs they set."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from backends.engine import EngineConfig

# Help for the engine flags, which are generated from EngineConfig's fields.
_ENGINE_HELP = {
    "max_batch": "requests decoded at once; the rest wait in a FIFO queue",
    "ttft_ms": "base time to first token",
    "prefill_ms_per_token": "added time to first token per prompt token",
    "decode_ms": "time per output token with a batch of 1",
    "batch_slowdown": "per-token time grows by this fraction per extra running request",
    "speed": "speed multiplier (0.5 = twice the time)",
    "kv_capacity_tokens": "KV-cache capacity in tokens (for the cache-usage gauges)",
    "block_size": "tokens per prefix-cache block",
    "cache_capacity_blocks": "prefix-cache capacity in blocks, 0 disables prefix caching",
}
# Shown instead of "(default None)" for knobs whose default is worked out from others.
_DERIVED_DEFAULTS = {"cache_capacity_blocks": "kv_capacity_tokens / block_size"}
# Fault flags passed to start_sim as knobs; --refuse is applied after start-up instead.
_FAULT_KNOBS = ("error_rate", "error_status", "hang", "drop_after_chunks", "unhealthy")


def _port_range(text: str) -> list[int]:
    low, sep, high = text.partition("-")
    try:
        ports = list(range(int(low), int(high if sep else low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r} (use 8001-8003)") from None
    if not ports or not 0 < ports[0] <= ports[-1] < 65536:
        raise argparse.ArgumentTypeError(f"not a port range: {text!r}")
    return ports


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see ``--help``); ``ports`` is all ports given, default [8000]."""
    p = argparse.ArgumentParser(
        prog="python -m backends.sim",
        description="Simulated OpenAI-compatible (vLLM-like) model servers, one per port.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, action="append", default=[], help="repeatable; 0 = any")
    p.add_argument("--ports", type=_port_range, default=[], help="inclusive range, e.g. 8001-8003")
    p.add_argument("--model", default="sim-model", help="served model name (default %(default)s)")
    p.add_argument("--name", help="instance name, one port only (default sim-<port>)")
    p.add_argument("--seed", type=int, help="seed for the fault dice (instance i gets seed+i)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = int if f.default is None else type(f.default)  # optional knobs are ints
        default = _DERIVED_DEFAULTS.get(f.name, "%(default)s")
        p.add_argument(
            flag, type=kind, default=f.default, help=f"{_ENGINE_HELP[f.name]} (default {default})"
        )
    p.add_argument("--error-rate", type=float, default=0.0, help="probability of an error answer")
    p.add_argument("--error-status", type=int, default=503, help="status of error answers")
    p.add_argument("--hang", action="store_true", help="accept requests and never answer")
    p.add_argument("--drop-after-chunks", type=int, help="abort streams after N chunks")
    p.add_argument("--refuse", action="store_true", help="start with the listener closed")
    p.add_argument("--unhealthy", action="store_true", help="/health answers 503")
    args = p.parse_args(argv)
    args.ports = args.port + args.ports or [8000]
    if args.name is not None and len(args.ports) > 1:
        p.error("--name needs exactly one port")
    return args


def start_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine and fault knobs set by ``args``, named as ``start_sim`` takes them.

    ``refuse`` is not among them: the caller applies it once the instance has bound its port.
    """
    knobs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    for name in _FAULT_KNOBS:
        knobs[name] = getattr(args, name)
    return knobs
