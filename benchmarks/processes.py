"""Child processes of a benchmark run: ports, pinning, readiness, CPU time, metrics, shutdown."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

R = TypeVar("R")

HOST = "127.0.0.1"
CPU_LOAD = 0  # wrk, the backends and the stream client
CPU_PROXY = 1  # the proxy, alone
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on: a process would not start, a tool failed, output was odd."""


@dataclass(frozen=True)
class Pinning:
    """Where processes run: ``enabled`` means every child is started under ``taskset``."""

    enabled: bool
    description: str

    def prefix(self, cpu: int) -> list[str]:
        """The argv prefix that pins a command to ``cpu``; empty when pinning is off."""
        return ["taskset", "-c", str(cpu)] if self.enabled else []


def detect_pinning() -> Pinning:
    """Pinning when ``taskset`` exists and CPUs 0 and 1 are both usable, else unpinned."""
    if shutil.which("taskset") is None:
        return Pinning(False, "unpinned: taskset not found")
    cpus = os.sched_getaffinity(0)
    if not {CPU_LOAD, CPU_PROXY} <= cpus:
        return Pinning(False, f"unpinned: CPUs 0 and 1 are not both available ({sorted(cpus)})")
    return Pinning(
        True,
        f"wrk, backends and stream client on CPU {CPU_LOAD}; proxy alone on CPU {CPU_PROXY}",
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago.

    All sockets stay bound until every port is chosen, so the kernel cannot hand out the same
    port twice; another program may still take one before the child binds it (rare).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class Service:
    """A child process with its output in ``log_path``; :func:`stop_all` ends it.

    The child gets its own session, so a Ctrl-C at the terminal reaches only the benchmark,
    whose ``finally`` then stops the child in order.
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with log_path.open("wb") as log:
            try:
                self.process = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise BenchError(f"cannot start {name}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, ports: Iterable[int], timeout_s: float = 15.0) -> None:
        """Return once every port accepts a TCP connection; raise :class:`BenchError` if the
        process exits or ``timeout_s`` passes first."""
        deadline = time.monotonic() + timeout_s
        for port in ports:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with code {self.process.returncode}:\n{self.log()}"
                    )
                try:
                    with socket.create_connection((HOST, port), timeout=1.0):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"{self.name} not listening on {port} after {timeout_s:g}s"
                        ) from None
                    time.sleep(0.05)

    def cpu_s(self) -> float:
        """User plus system CPU seconds used so far by the process (all its threads).

        Fields 14 and 15 of ``/proc/<pid>/stat``, in clock ticks; the command name in
        parentheses may hold spaces, so fields are counted after its closing parenthesis.
        """
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S

    def log(self, max_chars: int = 4000) -> str:
        """The end of what the process printed (stdout and stderr together)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]


def stop_all(services: list[Service], timeout_s: float = 5.0) -> None:
    """SIGTERM every live service, wait up to ``timeout_s`` in all, then SIGKILL the rest."""
    for service in services:
        if service.process.poll() is None:
            service.process.terminate()
    deadline = time.monotonic() + timeout_s
    for service in services:
        try:
            service.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def scrape_metrics(host: str, port: int) -> dict[str, Any]:
    """The proxy's own account of the run, from its admin ``/metrics``.

    Sums over pools and backends: client answers and upstream answers by status class
    (``none`` is an attempt that got no answer), upstream connections opened, client
    disconnects. ``{"error": ...}`` if the scrape fails.
    """
    # No ProxyHandler: an http_proxy in the environment must not capture loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}/metrics", timeout=5.0) as response:
            text = response.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    requests: Counter[str] = Counter()
    upstream: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, label_text = series.partition("{")
        labels = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        count = int(float(value))
        if name == "lb_requests_total":
            requests[labels.get("code_class", "?")] += count
        elif name == "lb_upstream_responses_total":
            upstream[labels.get("code_class", "?")] += count
        elif name in ("lb_upstream_connections_opened_total", "lb_client_disconnects_total"):
            totals[name.removeprefix("lb_").removesuffix("_total")] += count
    return {
        "requests_by_class": {k: v for k, v in sorted(requests.items()) if v},
        "upstream_responses_by_class": {k: v for k, v in sorted(upstream.items()) if v},
        "upstream_connections_opened": totals["upstream_connections_opened"],
        "client_disconnects": totals["client_disconnects"],
    }


class Stopped(Exception):
    """The run ended early; ``code`` is the process's exit code (1 failed, 130 interrupted)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally, which stops the children


def run_guarded(work: Callable[[], R], progress: Callable[[str], object]) -> R:
    """``work()``, with Ctrl-C and SIGTERM unwinding through its ``finally`` blocks (which stop
    the processes it started); raises :class:`Stopped` with the exit code when it does not
    finish, after saying why. SIGINT is set explicitly because a shell starting a benchmark in
    the background may have ignored it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return work()
    except KeyboardInterrupt:
        progress("interrupted; every process started was stopped")
        raise Stopped(130) from None
    except BenchError as exc:
        progress(f"failed: {exc}")
        raise Stopped(1) from None
