"""The small-request load: wrk posting a fixed OpenAI-style body, and parsing its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.processes import BenchError

PATH = "/v1/chat/completions"
BODY = (
    b'{"model":"bench-model","messages":[{"role":"system","content":"You are a helpful '
    b'assistant."},{"role":"user","content":"Say ok, please."}],"max_tokens":16,'
    b'"temperature":0.0,"stream":false,"user":"bench-client-0001"}'
)
assert len(BODY) == 215, "the request body is specified as 215 bytes"

# A Lua long string needs no escaping as long as the body holds no "]]".
SCRIPT = f"""-- lb benchmark: POST a {len(BODY)}-byte OpenAI-style chat completion request
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{BODY.decode()}]]
"""

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; latencies in milliseconds from wrk's ``--latency`` distribution.

    ``non_2xx`` is wrk's "Non-2xx or 3xx responses" line, which counts statuses of 400 and
    above; ``socket_errors`` sums its connect, read, write and timeout errors.
    """

    requests: int
    duration_s: float
    requests_per_s: float
    latency_ms_avg: float
    latency_ms_max: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    socket_errors_detail: str


def write_script(directory: Path) -> Path:
    """Write the Lua script into ``directory``; returns its path."""
    path = directory / "post.lua"
    path.write_text(SCRIPT)
    return path


def wrk_argv(
    prefix: list[str], connections: int, duration_s: int, script: Path, url: str
) -> list[str]:
    """The wrk command line: one thread, ``connections`` keep-alive connections."""
    return [
        *prefix,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def run_wrk(argv: list[str], duration_s: int) -> WrkResult:
    """Run wrk and parse its report; raises :class:`BenchError` if it fails."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from exc
    except OSError as exc:
        raise BenchError(f"cannot run wrk (apt-get install wrk): {exc}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def _search(pattern: str, output: str) -> re.Match[str]:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise BenchError(f"unexpected wrk output (no match for {pattern!r}):\n{output}")
    return match


def parse_wrk(output: str) -> WrkResult:
    """Parse wrk 4's text report; raises :class:`BenchError` when a line is missing."""
    latency = _search(rf"^\s+Latency\s+{_TIME}\s+{_TIME}\s+{_TIME}", output)
    total = _search(rf"^\s+(\d+) requests in {_TIME}", output)
    rate = _search(r"^Requests/sec:\s+([\d.]+)", output)
    percentiles = {
        int(m.group(1)): _ms(m.group(2), m.group(3))
        for m in re.finditer(rf"^\s+(\d+)%\s+{_TIME}\s*$", output, re.MULTILINE)
    }
    if not {50, 75, 90, 99} <= percentiles.keys():
        raise BenchError(f"wrk output has no latency distribution (run with --latency):\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    socket_counts = [int(n) for n in sockets.groups()] if sockets else [0, 0, 0, 0]
    detail = ", ".join(
        f"{kind} {n}"
        for kind, n in zip(("connect", "read", "write", "timeout"), socket_counts, strict=True)
    )
    return WrkResult(
        requests=int(total.group(1)),
        duration_s=_ms(total.group(2), total.group(3)) / 1000.0,
        requests_per_s=float(rate.group(1)),
        latency_ms_avg=_ms(latency.group(1), latency.group(2)),
        latency_ms_max=_ms(latency.group(5), latency.group(6)),
        p50_ms=percentiles[50],
        p75_ms=percentiles[75],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(socket_counts),
        socket_errors_detail=detail,
    )
