"""``make bench-routing``: routing strategies side by side on a fleet of simulated model servers.

Three scenarios, each run against every target (one lb process per strategy, plus
``least_loaded+prefix``, ``least_loaded`` with a prefix weight; and the peer routers
sglang-router and vllm-router) in interleaved rounds, every target of a round getting
the very same requests at the same offsets:

1. shared prefixes: tenants with long system prompts, multi-turn chats; time to first token,
   fleet output tokens per second, and the fleet's prefix-cache hit rate;
2. shared prefixes under load: the same kind of sessions, more of them and a hotter tenant
   popularity, so that strict affinity saturates the hot tenants' replica and queues form
   inside it: the same figures, where balancing affinity against load decides;
3. a heterogeneous fleet (one replica at half speed) with prompts that share nothing: request
   latency p50/p99 and the share of requests the slow replica got.

Before each segment the replicas' counters are zeroed and their prefix caches emptied; the
first seconds of a segment warm the caches and are not measured. Results go to
``benchmarks/results/routing-<date>.{json,md}`` and ``routing-latest.md``;
``benchmarks/README.md`` explains every number. Every child process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from benchmarks.machine import describe, host_label
from benchmarks.processes import (
    HOST,
    BenchError,
    Service,
    Stopped,
    run_guarded,
    scrape_metrics,
    stop_all,
)
from benchmarks.routing_client import LoopLag, RequestResult, run_script
from benchmarks.routing_report import intro, segment_row, summarise, write_results
from benchmarks.routing_targets import (
    Fleet,
    SimKnobs,
    Target,
    log_summary,
    start_fleet,
    start_targets,
)
from benchmarks.routing_workload import (
    Script,
    SharedPrefixShape,
    UniquePromptShape,
    shared_prefix_script,
    system_prompts,
    unique_prompt_script,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PEERS_DIR = Path("/tmp/lb-routing-peers")
SHARED_STRATEGIES = (
    "round_robin",
    "least_connections",
    "consistent_hash",
    "cache_aware",
    "least_loaded",
    "least_loaded+prefix",
)
HETERO_STRATEGIES = (
    "round_robin",
    "least_connections",
    "latency_weighted",
    "least_loaded",
    "consistent_hash",
    "cache_aware",
    "least_loaded+prefix",
)
SCENARIOS = ("shared", "loaded", "hetero")
REPLICAS = 4
SLOW_REPLICA = REPLICAS - 1  # the last one
QUEUE_SAMPLE_S = 0.25


@dataclass(frozen=True)
class Phase:
    """One scenario's timing: unmeasured warm-up, measured window, drain limit (seconds)."""

    warmup_s: float
    measure_s: float
    drain_s: float

    @property
    def load_s(self) -> float:
        return self.warmup_s + self.measure_s


@dataclass(frozen=True)
class Settings:
    """What one run does; see ``--help`` for each option."""

    rounds: int
    shared: Phase
    loaded: Phase
    hetero: Phase
    sessions_per_s: float
    loaded_sessions_per_s: float
    loaded_zipf_s: float
    requests_per_s: float
    slow_speed: float
    seed: int
    scenarios: tuple[str, ...]
    strategies: tuple[str, ...] | None  # lb strategies to run; None: every one
    peers: bool
    install_peers: bool
    peers_dir: Path
    knobs: SimKnobs


class Progress:
    """One line per step on stderr, stamped with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"routing [{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


async def run_segment(
    target: Target,
    fleet: Fleet,
    http: aiohttp.ClientSession,
    script: Script,
    phase: Phase,
) -> tuple[dict[str, Any], list[RequestResult]]:
    """One target, one round: reset the fleet, play ``script``, measure the middle window."""
    await fleet.reset(http)
    if not await fleet.wait_idle(http):
        raise BenchError("the fleet still has requests running after 15 s")
    marks: dict[str, Any] = {}
    queues: list[list[int]] = []
    lag = LoopLag()

    async def sample_queues() -> None:
        while True:
            queues.append([s["waiting"] for s in await fleet.stats(http)])
            await asyncio.sleep(QUEUE_SAMPLE_S)

    sampler: asyncio.Task[None] | None = None

    def cpu() -> dict[str, float]:
        return {
            "target": target.service.cpu_s(),
            "fleet": sum(s.cpu_s() for s in fleet.services),
            "client": time.process_time(),
            "wall": time.perf_counter(),
            "lag_index": float(len(lag.samples_s)),
        }

    async def start() -> None:
        nonlocal sampler
        marks["before"] = await fleet.stats(http)
        marks["cpu_before"] = cpu()
        sampler = asyncio.create_task(sample_queues())

    async def end() -> None:
        marks["cpu_after"] = cpu()
        marks["after"] = await fleet.stats(http)
        if sampler is not None:
            sampler.cancel()

    lag_task = asyncio.create_task(lag.watch())
    try:
        results, _ = await run_script(
            HOST,
            target.port,
            script,
            phase.load_s,
            phase.drain_s,
            [(phase.warmup_s, start), (phase.load_s, end)],
        )
    finally:
        lag_task.cancel()
        if sampler is not None:
            sampler.cancel()
    start_i, end_i = int(marks["cpu_before"]["lag_index"]), int(marks["cpu_after"]["lag_index"])
    marks["lag_s"] = lag.samples_s[start_i:end_i]
    marks["queues"] = queues
    measured = [r for r in results if phase.warmup_s <= r.start_s < phase.load_s]
    return segment_row(marks, measured, fleet.names), measured


async def run_scenario(
    name: str,
    targets: list[Target],
    fleet: Fleet,
    scripts: list[Script],
    phase: Phase,
    progress: Progress,
) -> dict[str, Any]:
    """Every round plays its script against every target, in an order rotated per round."""
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    pooled: dict[str, list[RequestResult]] = {t.name: [] for t in targets}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for round_no, script in enumerate(scripts, start=1):
            shift = (round_no - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                row, measured = await run_segment(target, fleet, http, script, phase)
                row["round"] = round_no
                rows[target.name].append(row)
                pooled[target.name].extend(measured)
                progress(
                    f"{name} round {round_no}/{len(scripts)} {target.name}: "
                    f"{row['requests']} requests, TTFT p90 {row['ttft_ms_p90']} ms, "
                    f"latency p99 {row['latency_ms_p99']} ms, hit rate {row['hit_rate']}, "
                    f"replica shares {row['replica_shares']}, errors {row['errors']}"
                )
    return {
        name: {"summary": summarise(rows[name], pooled[name]), "rounds": rows[name]}
        for name in rows
    }


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    """Start everything, run the scenarios, stop everything; returns the results document."""
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "host": host_label(),
        "machine": describe(ROOT),
        "settings": _settings_doc(settings),
        "peer_notes": {},
        "peer_versions": {},
    }
    shared_shape = SharedPrefixShape(sessions_per_s=settings.sessions_per_s)
    loaded_shape = SharedPrefixShape(
        sessions_per_s=settings.loaded_sessions_per_s, zipf_s=settings.loaded_zipf_s
    )
    hetero_shape = UniquePromptShape(requests_per_s=settings.requests_per_s)
    results["workload"] = {
        "shared": asdict(shared_shape),
        "loaded": asdict(loaded_shape),
        "hetero": asdict(hetero_shape),
    }
    shared_strategies = _only(SHARED_STRATEGIES, settings.strategies)
    hetero_strategies = _only(HETERO_STRATEGIES, settings.strategies)
    with tempfile.TemporaryDirectory(prefix="lb-routing-") as tmp_name:
        tmp = Path(tmp_name)
        services: list[Service] = []
        targets: dict[str, Target] = {}
        try:
            fleet = start_fleet(tmp, REPLICAS, settings.knobs, services, progress)
            wanted: list[str] = []
            if {"shared", "loaded"} & set(settings.scenarios):
                wanted += shared_strategies
            if "hetero" in settings.scenarios:
                wanted += [s for s in hetero_strategies if s not in wanted]
            targets = start_targets(
                tmp,
                wanted,
                settings.peers_dir if settings.peers else None,
                settings.install_peers,
                fleet,
                services,
                progress,
                results["peer_notes"],
                results["peer_versions"],
            )
            peers = [t for t in targets.values() if t.admin_port is None]
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                if "shared" in settings.scenarios:
                    prompts = system_prompts(settings.seed, shared_shape)
                    scripts = [
                        shared_prefix_script(
                            settings.seed * 1000 + r, shared_shape, prompts, settings.shared.load_s
                        )
                        for r in range(1, settings.rounds + 1)
                    ]
                    chosen = [targets[f"lb {s}"] for s in shared_strategies] + peers
                    progress(f"shared prefixes: {len(chosen)} targets, {settings.rounds} rounds")
                    results["shared"] = runner.run(
                        run_scenario("shared", chosen, fleet, scripts, settings.shared, progress)
                    )
                if "loaded" in settings.scenarios:
                    # The same tenants' system prompts as scenario 1, other sessions.
                    prompts = system_prompts(settings.seed, loaded_shape)
                    scripts = [
                        shared_prefix_script(
                            settings.seed * 1000 + 200 + r,
                            loaded_shape,
                            prompts,
                            settings.loaded.load_s,
                        )
                        for r in range(1, settings.rounds + 1)
                    ]
                    chosen = [targets[f"lb {s}"] for s in shared_strategies] + peers
                    progress(
                        f"shared prefixes under load: {len(chosen)} targets, "
                        f"{settings.rounds} rounds"
                    )
                    results["loaded"] = runner.run(
                        run_scenario("loaded", chosen, fleet, scripts, settings.loaded, progress)
                    )
                if "hetero" in settings.scenarios:
                    scripts = [
                        unique_prompt_script(
                            settings.seed * 1000 + 500 + r, hetero_shape, settings.hetero.load_s
                        )
                        for r in range(1, settings.rounds + 1)
                    ]
                    speeds = [1.0] * REPLICAS
                    speeds[SLOW_REPLICA] = settings.slow_speed
                    runner.run(_set_speeds(fleet, speeds))
                    chosen = [targets[f"lb {s}"] for s in hetero_strategies] + peers
                    progress(
                        f"heterogeneous fleet (sim-{fleet.ports[SLOW_REPLICA]} at speed "
                        f"{settings.slow_speed}): {len(chosen)} targets, {settings.rounds} rounds"
                    )
                    results["hetero"] = runner.run(
                        run_scenario("hetero", chosen, fleet, scripts, settings.hetero, progress)
                    )
                    results["slow_replica"] = fleet.names[SLOW_REPLICA]
            results["replicas"] = fleet.names
            results["lb_metrics"] = {
                t.name: scrape_metrics(HOST, t.admin_port)
                for t in targets.values()
                if t.admin_port is not None
            }
        finally:
            progress(f"stopping {len(services)} processes")
            stop_all(services)
        results["logs"] = {t.name: log_summary(t.service) for t in targets.values()}
    return results


def _only(strategies: tuple[str, ...], wanted: tuple[str, ...] | None) -> list[str]:
    return [s for s in strategies if wanted is None or s in wanted]


async def _set_speeds(fleet: Fleet, speeds: list[float]) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        await fleet.set_speeds(http, speeds)


def _settings_doc(settings: Settings) -> dict[str, Any]:
    doc = asdict(settings)
    doc["peers_dir"] = str(settings.peers_dir)
    doc["replicas"] = REPLICAS
    doc["shared_strategies"] = list(SHARED_STRATEGIES)
    doc["hetero_strategies"] = list(HETERO_STRATEGIES)
    doc["pinning"] = "unpinned: every process may run on any CPU"
    return doc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.routing",
        description="Routing strategies side by side on simulated replicas; "
        "writes benchmarks/results/routing-<date>.{json,md}.",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (2)")
    p.add_argument("--warmup", type=float, default=4.0, help="scenario 1 warm-up seconds (4)")
    p.add_argument("--measure", type=float, default=12.0, help="scenario 1 measured seconds (12)")
    p.add_argument("--loaded-warmup", type=float, default=4.0, help="scenario 2 warm-up (4)")
    p.add_argument("--loaded-measure", type=float, default=12.0, help="scenario 2 measured (12)")
    p.add_argument("--hetero-warmup", type=float, default=2.0, help="scenario 3 warm-up (2)")
    p.add_argument("--hetero-measure", type=float, default=8.0, help="scenario 3 measured (8)")
    p.add_argument("--drain", type=float, default=10.0, help="longest wait for stragglers (10)")
    p.add_argument("--sessions-per-s", type=float, default=20.0, help="scenario 1 rate (20)")
    p.add_argument("--loaded-sessions-per-s", type=float, default=30.0, help="scenario 2 rate (30)")
    p.add_argument(
        "--loaded-zipf", type=float, default=1.2, help="scenario 2 tenant popularity (1.2)"
    )
    p.add_argument("--requests-per-s", type=float, default=80.0, help="scenario 3 rate (80)")
    p.add_argument("--slow-speed", type=float, default=0.5, help="slow replica's speed (0.5)")
    p.add_argument("--cache-blocks", type=int, default=384, help="prefix cache per replica (384)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (1)")
    p.add_argument(
        "--scenario",
        choices=("all", "shared", "loaded", "hetero"),
        action="append",
        help="which; repeat for several (all)",
    )
    p.add_argument(
        "--strategies",
        help="comma-separated lb strategies to run (every one); the peers run unless --no-peers",
    )
    p.add_argument("--no-peers", action="store_true", help="lb strategies only")
    p.add_argument(
        "--no-install-peers", action="store_true", help="skip peers not already installed"
    )
    p.add_argument("--peers-dir", type=Path, default=PEERS_DIR, help=f"peer venvs ({PEERS_DIR})")
    p.add_argument("--quick", action="store_true", help="one short round (about 5 minutes)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit code 0 on success, 1 on a failure, 130 when interrupted."""
    args = _parser().parse_args(argv)
    shared = Phase(args.warmup, args.measure, args.drain)
    loaded = Phase(args.loaded_warmup, args.loaded_measure, args.drain)
    hetero = Phase(args.hetero_warmup, args.hetero_measure, args.drain)
    rounds = args.rounds
    if args.quick:
        rounds = 1
        shared = replace(shared, warmup_s=2.5, measure_s=4.5, drain_s=5.0)
        loaded = replace(loaded, warmup_s=2.5, measure_s=4.5, drain_s=5.0)
        hetero = replace(hetero, warmup_s=1.5, measure_s=3.0, drain_s=5.0)
    rates = (args.sessions_per_s, args.loaded_sessions_per_s, args.requests_per_s)
    if rounds < 1 or min(*rates, args.slow_speed, args.loaded_zipf) <= 0:
        _parser().error("--rounds, the rates, the speed and the exponent must be positive")
    chosen = args.scenario or ["all"]
    scenarios = SCENARIOS if "all" in chosen else tuple(s for s in SCENARIOS if s in chosen)
    strategies = None
    if args.strategies:
        strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
        known = set(SHARED_STRATEGIES) | set(HETERO_STRATEGIES)
        if not set(strategies) <= known:
            _parser().error(f"--strategies: choose among {', '.join(sorted(known))}")
    settings = Settings(
        rounds=rounds,
        shared=shared,
        loaded=loaded,
        hetero=hetero,
        sessions_per_s=args.sessions_per_s,
        loaded_sessions_per_s=args.loaded_sessions_per_s,
        loaded_zipf_s=args.loaded_zipf,
        requests_per_s=args.requests_per_s,
        slow_speed=args.slow_speed,
        seed=args.seed,
        scenarios=scenarios,
        strategies=strategies,
        peers=not args.no_peers,
        install_peers=not args.no_install_peers,
        peers_dir=args.peers_dir,
        knobs=SimKnobs(cache_capacity_blocks=args.cache_blocks),
    )
    progress = Progress()
    try:
        results = run_guarded(lambda: run(settings, progress), progress)
    except Stopped as stopped:
        return stopped.code
    paths = write_results(results, args.output, intro(results))
    progress("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
