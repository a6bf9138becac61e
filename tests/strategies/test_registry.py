"""Tests for lb.strategies.registry: resolving names and import paths, building strategies."""

from __future__ import annotations

import random
import re

import pytest

from lb.backend import Backend
from lb.strategies import (
    BUILTIN,
    LatencyWeighted,
    LeastConnections,
    RequestInfo,
    RoundRobin,
    build,
    resolve,
)
from tests.strategies.custom_strategy import FirstBackend

REQUEST = RequestInfo(method="GET", path="/v1/models")
CUSTOM = "tests.strategies.custom_strategy"


def make_backends(n: int) -> list[Backend]:
    return [Backend.from_url(f"http://127.0.0.1:{8001 + i}") for i in range(n)]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("round_robin", RoundRobin),
        ("least_connections", LeastConnections),
        ("latency_weighted", LatencyWeighted),
    ],
)
def test_builtin_names_resolve_to_their_classes(name: str, cls: type) -> None:
    """Each built-in name resolves to the class whose ``name`` it is."""
    assert resolve(name) is cls
    assert cls.name == name


def test_builtin_keys_are_the_class_names() -> None:
    """The registry key, the class's name and hence the metric label are one string."""
    assert all(key == cls.name for key, cls in BUILTIN.items())


def test_custom_class_resolves_by_colon_path() -> None:
    """A user class named as ``package.module:ClassName`` resolves."""
    assert resolve(f"{CUSTOM}:FirstBackend") is FirstBackend


def test_custom_class_resolves_by_dotted_path() -> None:
    """A user class named as ``package.module.ClassName`` resolves too."""
    assert resolve(f"{CUSTOM}.FirstBackend") is FirstBackend


def test_custom_class_builds_and_picks() -> None:
    """A user strategy built from its path picks as it was written to."""
    backends = make_backends(3)
    strategy = build(f"{CUSTOM}:FirstBackend", backends)
    assert isinstance(strategy, FirstBackend)
    assert strategy.pick(backends[1:], REQUEST) is backends[1]


def test_build_passes_backends_rng_clock_and_options() -> None:
    """build hands the pool, rng, clock and options to the constructor."""
    backends = make_backends(2)
    rng = random.Random(1234)

    def clock() -> float:
        return 5.0

    strategy = build("latency_weighted", backends, rng=rng, clock=clock, options={"decay_s": 3})
    assert isinstance(strategy, LatencyWeighted)
    assert strategy.backends == tuple(backends)
    assert strategy.rng is rng
    assert strategy.clock is clock
    assert strategy.decay_s == 3.0


def test_unknown_name_lists_the_builtins() -> None:
    """An unknown bare name is rejected with the list of built-in names."""
    with pytest.raises(ValueError, match=r"unknown strategy 'fastest'.*round_robin"):
        resolve("fastest")


def test_unimportable_module_names_it_and_the_import_error() -> None:
    """A module that cannot be imported is named, with the import error's text."""
    with pytest.raises(
        ValueError, match=r"cannot import module 'no_such_pkg\.mod'.*No module named 'no_such_pkg'"
    ):
        resolve("no_such_pkg.mod:Strategy")


def test_missing_attribute_is_named() -> None:
    """A class name the module does not define is rejected naming both."""
    with pytest.raises(ValueError, match=f"module '{CUSTOM}' has no attribute 'Nope'"):
        resolve(f"{CUSTOM}:Nope")


def test_non_class_is_rejected() -> None:
    """An attribute that is not a class is rejected saying what it is."""
    with pytest.raises(ValueError, match="'NOT_A_CLASS' is a int, not a class"):
        resolve(f"{CUSTOM}:NOT_A_CLASS")


def test_class_not_deriving_from_strategy_is_rejected() -> None:
    """A class that is not a Strategy subclass is rejected."""
    with pytest.raises(
        ValueError, match=re.escape("is not a subclass of lb.strategies.base.Strategy")
    ):
        resolve(f"{CUSTOM}:NotAStrategy")


def test_abstract_strategy_is_rejected() -> None:
    """A Strategy subclass that does not implement pick is rejected."""
    with pytest.raises(ValueError, match="'Unfinished' is abstract"):
        resolve(f"{CUSTOM}:Unfinished")


def test_empty_module_or_class_part_is_rejected() -> None:
    """A path with nothing before or after the colon is rejected."""
    with pytest.raises(ValueError, match="not an import path"):
        resolve(":FirstBackend")


def test_unknown_option_is_rejected() -> None:
    """An option a built-in strategy does not take is rejected naming option and strategy."""
    with pytest.raises(ValueError, match="unknown option 'x' for strategy 'round_robin'"):
        build("round_robin", make_backends(2), options={"x": 1})


def test_custom_class_without_options_allowed_accepts_any_option() -> None:
    """A user class that declares no options_allowed receives its options unchecked."""
    strategy = build(f"{CUSTOM}:FirstBackend", make_backends(1), options={"anything": 1})
    assert strategy.options == {"anything": 1}


def test_constructor_failure_becomes_value_error() -> None:
    """A user class whose constructor raises is reported as a ValueError with the cause."""
    with pytest.raises(ValueError, match="could not be built: RuntimeError: model catalogue"):
        build(f"{CUSTOM}:Broken", make_backends(1))


def test_a_strategy_that_calls_sys_exit_is_a_config_error_not_the_proxys_exit() -> None:
    """sys.exit() while importing or building user code is reported like any other error
    there: on a reload it would otherwise end the running proxy."""
    with pytest.raises(ValueError, match=r"cannot import module .*SystemExit: this module is"):
        resolve("tests.strategies.exiting_strategy:Anything")
    with pytest.raises(ValueError, match="could not be built: SystemExit: 3"):
        build(f"{CUSTOM}:Exits", make_backends(1))


def test_a_strategy_may_keep_anything_in_the_request_infos_key() -> None:
    info = RequestInfo(method="POST", path="/v1/chat/completions")
    for key in (b"bytes", 42, ("a", 1), None, "text"):
        info.key = key
        assert info.key == key
