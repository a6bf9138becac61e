"""``python -m benchmarks.picking``: the cost of choosing a backend, per strategy and fleet size.

One *pick* is what the proxy does on a request's first attempt (``lb.proxy``):
``pool.candidates(())`` and then, unless a single candidate is left, ``strategy.pick``. It is
timed for every built-in strategy (``lb.strategies.BUILTIN``) over 2, 10, 100 and 1,000
backends, in one process, with no I/O: the question is whether the choice stays flat as the
fleet grows, or costs something per backend.

The state is made to look like a busy fleet, and drawn again (untimed) before every batch:

- every backend weighs 1 (identical replicas, the common case); ``least_connections`` and
  ``round_robin`` are timed a second time with one backend in four weighing 2, as
  ``least_connections`` picks differently then and unequal weights are what ``round_robin``'s
  schedule is for;
- in-flight counts uniform in 0..8;
- latency estimates (peak EWMA) of 0.2..3 s stamped up to 2 s ago; one backend in twenty
  carries recent failures (a failure score of 0.5..3, up to 5 s old);
- fresh load reports for ``least_loaded``: queue 0..6, running 0..32, KV usage 0..1, at most
  0.5 s old (``max_age_s`` is 1 s);
- prompts of ~2,000 characters: one of 64 tenant system prompts (1,200..1,800 characters)
  followed by a tail of the request's own. ``consistent_hash`` keys on the first 1,024
  characters (its default 256 tokens), so on the tenant's prompt; ``cache_aware`` starts each
  size with a tree warmed by 4,000 picks, which takes it to its default budget (2,000,000
  characters), so measured picks match, insert and evict as in a steady state. Every tenant
  is then known, so each measured pick matches a prefix: the scan for the smallest tree,
  which a prompt with a new prefix pays (another pass over the candidates), is not included.

Timing: ``time.perf_counter_ns`` around batches of back-to-back picks. Every cell (strategy
and size) is set up first; each then runs growing batches until one takes 2 ms (a warm-up that
also calibrates), and its batches are sized so that ``--batches`` of them take about
``--cell-s``. The batches are timed in ``--rounds`` interleaved rounds (every cell its share of
the batches, then every cell again), so a slow spell of a shared machine touches all alike. The
figure reported is the median over a cell's batches of (batch time / picks). The loop and the
call into the pick are counted, as the proxy pays them too. A second table times
``Pool.candidates`` alone, the part of a pick the pool does before any strategy runs.

Results: ``benchmarks/results/picking-<date>.json`` (settings, machine, every batch) and
``benchmarks/results/picking-latest.md``. A default run takes about 10 seconds.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import random
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.machine import describe
from lb.backend import Backend
from lb.pool import Pool, PoolTimeouts
from lb.strategies import BUILTIN, RequestInfo, Strategy, build

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
SIZES = (2, 10, 100, 1000)
SEED = 20261122

TENANTS = 64
PROMPTS = 4096  # distinct prompts cycled through; enough that a repeat is long evicted
PROMPT_CHARS = 2000
CACHE_WARM_PICKS = 4000
CALIBRATE_NS = 2_000_000  # a calibration batch this long is also the cell's warm-up
MAX_CONCURRENCY = 16  # for the Pool.candidates variant with limits


def text(rng: random.Random, words: Sequence[str], chars: int) -> str:
    """``chars`` characters of ``words`` drawn at random, separated by spaces."""
    out: list[str] = []
    length = 0
    while length < chars:
        word = rng.choice(words)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:chars]


def make_prompts(rng: random.Random) -> list[str]:
    """``PROMPTS`` prompts of ~``PROMPT_CHARS``: a tenant's system prompt, then a tail."""
    letters = string.ascii_lowercase
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2000)]
    systems = [
        f"tenant {t}: " + text(rng, words, rng.randint(1200, 1800)) + "\n" for t in range(TENANTS)
    ]
    prompts = []
    for i in range(PROMPTS):
        system = rng.choice(systems)
        prompts.append(f"{system}request {i}: {text(rng, words, PROMPT_CHARS - len(system))}")
    return prompts


def make_backends(
    n: int, *, mixed_weights: bool = False, max_concurrency: int | None = None
) -> list[Backend]:
    """``n`` backends on made-up addresses, of weight 1 (every fourth of weight 2 if mixed)."""
    return [
        Backend.from_url(
            f"http://10.0.{i // 250}.{i % 250 + 1}:8000",
            weight=2 if mixed_weights and i % 4 == 3 else 1,
            max_concurrency=max_concurrency,
        )
        for i in range(n)
    ]


def randomise_load(backends: Sequence[Backend], rng: random.Random, now_s: float) -> None:
    """Give every backend the load of a busy fleet (see the module docstring)."""
    for b in backends:
        b.in_flight = rng.randint(0, 8)
        b.rtt_estimate_s = rng.uniform(0.2, 3.0)
        b.rtt_stamp_s = now_s - rng.uniform(0.0, 2.0)
        if rng.random() < 0.05:
            b.failure_score = rng.uniform(0.5, 3.0)
            b.failure_stamp_s = now_s - rng.uniform(0.0, 5.0)
        else:
            b.failure_score = 0.0
        b.reported_waiting = float(rng.randint(0, 6))
        b.reported_running = float(rng.randint(0, 32))
        b.reported_kv_usage = rng.random()
        b.reported_at_s = now_s - rng.uniform(0.0, 0.5)


def make_pool(backends: Sequence[Backend], strategy: Strategy) -> Pool:
    """A pool as the app builds it, minus connections (a pick opens none)."""
    return Pool("bench", backends, strategy, {}, PoolTimeouts())


@dataclass
class Cell:
    """One thing to time: ``one`` call is one pick; ``prepare`` redraws the load, untimed."""

    info: dict[str, Any]
    one: Callable[[], object]
    prepare: Callable[[], None]
    per_batch: int = 1
    samples: list[float] = field(default_factory=list)  # ns per call, one per batch

    def calibrate(self, batch_s: float) -> None:
        """Run growing batches until one takes ``CALIBRATE_NS`` (a warm-up too), then size
        batches to take about ``batch_s``."""
        clock, one = time.perf_counter_ns, self.one
        count = 1
        while True:
            self.prepare()
            start = clock()
            for _ in range(count):
                one()
            elapsed = clock() - start
            if elapsed >= CALIBRATE_NS:
                break
            count *= 2
        self.per_batch = max(1, round(count * batch_s * 1e9 / elapsed))

    def time_batches(self, batches: int) -> None:
        clock, one, per_batch = time.perf_counter_ns, self.one, self.per_batch
        for _ in range(batches):
            self.prepare()
            start = clock()
            for _ in range(per_batch):
                one()
            self.samples.append((clock() - start) / per_batch)

    def summary(self) -> dict[str, Any]:
        samples = self.samples
        return {
            **self.info,
            "median_ns": round(statistics.median(samples)),
            "min_ns": round(min(samples)),
            "max_ns": round(max(samples)),
            "picks_per_batch": self.per_batch,
            "batches_ns": [round(s) for s in samples],
        }


def cases(strategies: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(row label, strategy, mixed weights) for each row of the picks table."""
    rows = [(name, name, False) for name in strategies]
    for name in ("least_connections", "round_robin"):
        if name in strategies:
            rows.append((f"{name}, weights 1 and 2", name, True))
    return rows


def strategy_cell(label: str, name: str, mixed: bool, n: int, prompts: list[str]) -> Cell:
    """First-attempt picks of strategy ``name`` over ``n`` backends, set up and warmed."""
    rng = random.Random(f"{SEED}-{label}-{n}")
    backends = make_backends(n, mixed_weights=mixed)
    strategy = build(name, backends, rng=random.Random(SEED))
    pool = make_pool(backends, strategy)
    requests = [
        RequestInfo(
            method="POST",
            path="/v1/chat/completions",
            headers=[(b"content-type", b"application/json")],
            model="bench-model",
            user=f"user-{i % 97}",
            prompt=prompt,
        )
        for i, prompt in enumerate(prompts)
    ]
    next_request = itertools.cycle(requests).__next__
    pick = strategy.pick
    candidates = pool.candidates
    no_tries: tuple[Backend, ...] = ()

    def one() -> Backend:
        # As lb.proxy does on a first attempt.
        request = next_request()
        eligible = candidates(no_tries)
        return eligible[0] if len(eligible) == 1 else pick(eligible, request)

    def prepare() -> None:
        randomise_load(backends, rng, time.monotonic())

    setup_start = time.perf_counter()
    prepare()
    if name == "cache_aware":
        for _ in range(CACHE_WARM_PICKS):
            one()
    info = {
        "label": label,
        "strategy": name,
        "weights": "1 and 2" if mixed else "equal",
        "backends": n,
        "setup_s": round(time.perf_counter() - setup_start, 3),
    }
    return Cell(info, one, prepare)


CANDIDATE_CASES = {
    "first attempt": "no backend tried, no max_concurrency (what every table row above pays)",
    "first attempt, max_concurrency": f"no backend tried, every backend max_concurrency "
    f"{MAX_CONCURRENCY}",
    "retry": "one backend already tried, no max_concurrency",
}


def candidates_cell(case: str, n: int) -> Cell:
    """``Pool.candidates`` alone, for one of ``CANDIDATE_CASES``."""
    rng = random.Random(f"{SEED}-candidates-{case}-{n}")
    limited = case == "first attempt, max_concurrency"
    backends = make_backends(n, max_concurrency=MAX_CONCURRENCY if limited else None)
    pool = make_pool(backends, build("round_robin", backends))
    tried: tuple[Backend, ...] = (backends[0],) if case == "retry" else ()
    candidates = pool.candidates

    def one() -> object:
        return candidates(tried)

    def prepare() -> None:
        randomise_load(backends, rng, time.monotonic())

    return Cell({"case": case, "backends": n}, one, prepare)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _grid(cells: list[dict[str, Any]], key: str, sizes: Sequence[int]) -> list[list[str]]:
    """One row per ``key`` value: ns per size, growth from the smallest to the largest size,
    and the slope (ns per extra backend) between the two largest sizes."""
    rows = []
    for label in dict.fromkeys(cell[key] for cell in cells):
        by_size = {c["backends"]: c["median_ns"] for c in cells if c[key] == label}
        row = [label]
        row += [f"{by_size[n]:,}" for n in sizes]
        lo, hi = sizes[0], sizes[-1]
        row.append(f"{by_size[hi] / by_size[lo]:.1f}x")
        prev = sizes[-2] if len(sizes) >= 2 else hi
        row.append(f"{(by_size[hi] - by_size[prev]) / (hi - prev):.1f}" if hi > prev else "-")
        rows.append(row)
    return rows


def render(results: dict[str, Any]) -> str:
    """The Markdown summary of a run."""
    machine, settings = results["machine"], results["settings"]
    sizes: list[int] = settings["sizes"]
    commit = machine["git_commit"] + (" (with uncommitted changes)" if machine["git_dirty"] else "")
    header_sizes = [f"n={n:,}" for n in sizes]
    load_start, load_end = machine["load_average_1m"]
    slope = f"ns per backend ({sizes[-2]:,}..{sizes[-1]:,})" if len(sizes) >= 2 else "slope"
    growth = f"{sizes[-1]:,} vs {sizes[0]:,}"
    lines = [
        f"# lb picking benchmark, {results['date']}",
        "",
        "Median ns per first-attempt pick (`Pool.candidates(())` + `strategy.pick`), made by "
        "`python -m benchmarks.picking`; the module docstring describes the state and the "
        "timing.",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", f"{machine['cpu_model']}, {machine['cpu_count']} cores"],
                ["Python", machine["python"]],
                ["Load average (1 min)", f"{load_start} at the start, {load_end} at the end"],
                ["Commit", commit],
                [
                    "Timing",
                    f"{settings['batches']} batches per cell over {settings['rounds']} "
                    f"interleaved rounds, ~{settings['cell_s']} s per cell, "
                    f"{results['elapsed_s']:.0f} s in all",
                ],
            ],
        ),
        "",
        "## Pick, per strategy",
        "",
        *_table(
            ["strategy", *header_sizes, growth, slope],
            _grid(results["picks"], "label", sizes),
        ),
        "",
        "## `Pool.candidates` alone",
        "",
        *_table(
            ["case", *header_sizes, growth, slope],
            _grid(results["candidates"], "case", sizes),
        ),
        "",
        *[f"- {case}: {meaning}" for case, meaning in CANDIDATE_CASES.items()],
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.picking", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--cell-s", type=float, default=0.2, help="seconds timed per cell")
    parser.add_argument("--batches", type=int, default=9, help="timed batches per cell")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds the batches are spread over"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="fleet sizes (backends)"
    )
    parser.add_argument(
        "--strategies", nargs="+", default=list(BUILTIN), choices=list(BUILTIN), metavar="NAME"
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sorted(set(args.sizes))
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    prompts = make_prompts(random.Random(SEED))
    picks = [
        strategy_cell(label, name, mixed, n, prompts)
        for label, name, mixed in cases(args.strategies)
        for n in sizes
    ]
    candidates = [candidates_cell(case, n) for case in CANDIDATE_CASES for n in sizes]
    cells = picks + candidates
    per_round = max(1, args.batches // args.rounds)
    for cell in cells:
        cell.calibrate(args.cell_s / (per_round * args.rounds))
    print(f"set up {len(cells)} cells in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for round_ in range(args.rounds):
        gc.collect()
        for cell in cells:
            cell.time_batches(per_round)
        print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    for cell in picks:
        line = f"{cell.info['label']:36} n={cell.info['backends']:<5}"
        print(f"{line} {statistics.median(cell.samples):>11,.0f} ns/pick", file=sys.stderr)
    for cell in candidates:
        line = f"candidates: {cell.info['case']:24} n={cell.info['backends']:<5}"
        print(f"{line} {statistics.median(cell.samples):>11,.0f} ns", file=sys.stderr)
    machine = describe(ROOT)
    machine.pop("wrk", None)  # nothing here runs wrk
    machine.pop("packages", None)  # nor uvloop, aiohttp or httptools
    # Other work on the machine shifts whole cells; the 1-minute load average shows it.
    machine["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    today = date.today().isoformat()
    results = {
        "benchmark": "picking",
        "date": today,
        "settings": {
            "sizes": sizes,
            "strategies": args.strategies,
            "cell_s": args.cell_s,
            "batches": per_round * args.rounds,
            "rounds": args.rounds,
            "seed": SEED,
            "tenants": TENANTS,
            "prompts": PROMPTS,
            "prompt_chars": PROMPT_CHARS,
            "cache_warm_picks": CACHE_WARM_PICKS,
        },
        "machine": machine,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "picks": [cell.summary() for cell in picks],
        "candidates": [cell.summary() for cell in candidates],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    json_path = args.output / f"picking-{today}.json"
    md_path = args.output / "picking-latest.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render(results))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
