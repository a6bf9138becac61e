"""The strategy registry: turns a configured name or import path into a strategy instance.

A spec is either a built-in name (the key in :data:`BUILTIN`, which is also the class's ``name``,
the config value and the metric label) or the import path of a user class,
``package.module:ClassName`` (``package.module.ClassName`` is accepted too). Every way a spec can
be wrong raises ``ValueError`` with a reason a person can act on; config loading reports it with
the key path.
"""

from __future__ import annotations

import importlib
import inspect
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lb.backend import Backend
from lb.strategies.base import Clock, Strategy
from lb.strategies.cache_aware import CacheAware
from lb.strategies.consistent_hash import ConsistentHash
from lb.strategies.latency_weighted import LatencyWeighted
from lb.strategies.least_connections import LeastConnections
from lb.strategies.least_loaded import LeastLoaded
from lb.strategies.round_robin import RoundRobin

BUILTIN: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RoundRobin,
        LeastConnections,
        LatencyWeighted,
        LeastLoaded,
        ConsistentHash,
        CacheAware,
    )
}


def resolve(spec: str) -> type[Strategy]:
    """Return the strategy class named by ``spec``; raise ``ValueError`` saying why it cannot.

    Built-in names are looked up first; anything else with a ``:`` or a ``.`` is imported.
    """
    builtin = BUILTIN.get(spec)
    if builtin is not None:
        return builtin
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    elif "." in spec:
        module_name, _, attr_path = spec.rpartition(".")
    else:
        raise ValueError(
            f"unknown strategy {spec!r}: use one of {', '.join(BUILTIN)}, "
            "or the import path of a class, 'package.module:ClassName'"
        )
    if not module_name or not attr_path:
        raise ValueError(
            f"strategy {spec!r} is not an import path of the form 'package.module:Class'"
        )

    try:
        module = importlib.import_module(module_name)
    # Any error raised while importing user code is a config error; so is a sys.exit() in
    # it, which would otherwise end the proxy (on a reload, the running one).
    except (Exception, SystemExit) as exc:
        raise ValueError(
            f"strategy {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc

    obj: object = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"strategy {spec!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None

    if not isinstance(obj, type):
        raise ValueError(f"strategy {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a class")
    if not issubclass(obj, Strategy):
        raise ValueError(
            f"strategy {spec!r}: class {attr_path!r} is not a subclass of "
            "lb.strategies.base.Strategy"
        )
    if inspect.isabstract(obj):
        raise ValueError(
            f"strategy {spec!r}: class {attr_path!r} is abstract (it must define pick)"
        )
    return obj


def build(
    spec: str,
    backends: Sequence[Backend],
    *,
    rng: random.Random | None = None,
    clock: Clock = time.monotonic,
    options: Mapping[str, Any] | None = None,
) -> Strategy:
    """Resolve ``spec`` and instantiate it over ``backends``; raise ``ValueError`` if either fails.

    A class that declares ``options_allowed`` (every built-in does) rejects any other option
    key here; a class without it receives ``options`` unchecked and validates them itself.
    ``rng`` defaults to a fresh ``random.Random()``, ``clock`` to ``time.monotonic``.
    """
    cls = resolve(spec)
    options = dict(options or {})
    allowed: frozenset[str] | None = getattr(cls, "options_allowed", None)
    if allowed is not None:
        unknown = [key for key in options if key not in allowed]
        if unknown:
            noun = "option" if len(unknown) == 1 else "options"
            accepted = ", ".join(sorted(allowed)) if allowed else "none"
            raise ValueError(
                f"unknown {noun} {', '.join(repr(key) for key in unknown)} for strategy "
                f"{cls.name!r} (it accepts: {accepted})"
            )
    try:
        return cls(backends, rng=rng, clock=clock, options=options)
    except ValueError:
        raise
    except (Exception, SystemExit) as exc:  # a user class failing to construct is one too
        raise ValueError(
            f"strategy {spec!r} could not be built: {type(exc).__name__}: {exc}"
        ) from exc
