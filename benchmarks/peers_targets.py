"""What ``make bench-peers`` starts: installing each proxy, starting it, checking it serves.

Every process is a :class:`~benchmarks.processes.Service` appended to the caller's list as soon
as it exists, so the caller's ``finally`` stops it whatever happens next. A peer that cannot be
installed or will not serve raises :class:`~benchmarks.processes.BenchError`; the caller skips
it with a note. The CPU a proxy uses is read from ``/proc`` for its whole process tree (nginx's
worker, lb's workers), not only the process started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers_configs import (
    LITELLM_ENV,
    haproxy_cfg,
    lb_config,
    litellm_config,
    nginx_conf,
)
from benchmarks.processes import CLOCK_TICKS_PER_S, HOST, BenchError, Service, free_ports
from benchmarks.routing_targets import PeerSpec, ensure_peer
from benchmarks.wrk import BODY, PATH

ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str], None]
APT_PACKAGES = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk"}
INSTALL_TIMEOUT_S = 900.0
READY_TIMEOUT_S = 40.0
LITELLM_READY_TIMEOUT_S = 120.0  # it imports a great deal before it listens
LITELLM_PACKAGE = "litellm[proxy]"
ROUTERS = {
    "vllm-router": PeerSpec("vllm-router", "vllm-router", "round_robin"),
    "sglang-router": PeerSpec("sglang-router", "sglang-router", "round_robin"),
}


@dataclass
class Target:
    """Somewhere to send load: a backend directly, or a proxy in front of the backends.

    ``placement`` says where the proxy runs (``CPU 1``, or unpinned); ``connections`` overrides
    wrk's connection count for this target only (``None``: the run's setting).
    """

    name: str
    port: int
    service: Service | None
    placement: str
    connections: int | None = None
    stream_waves: int | None = None
    admin_port: int | None = None
    configs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"


def parse_stat(text: str) -> tuple[int, int]:
    """``(ppid, utime + stime in clock ticks)`` from one ``/proc/<pid>/stat`` line.

    The command name in parentheses may hold spaces, so fields are counted after its closing
    parenthesis: ppid is field 4, utime and stime fields 14 and 15.
    """
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


ProcTable = dict[int, tuple[int, int]]  # pid -> (ppid, CPU clock ticks)


def proc_table() -> ProcTable:
    """Every process's parent and CPU ticks so far, from ``/proc``."""
    table: ProcTable = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            table[int(entry)] = parse_stat(Path(f"/proc/{entry}/stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the process ended while the table was read
    return table


def tree_cpu_s(pid: int, table: ProcTable) -> float:
    """CPU seconds used by ``pid`` and every live descendant (all their threads) in ``table``."""
    parents = {p: ppid for p, (ppid, _) in table.items()}
    return sum(table[p][1] for p in descendants(pid, parents)) / CLOCK_TICKS_PER_S


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """``root`` and every process below it, given each process's parent."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found = {root} if root in parents else set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ensure_apt(commands: list[str], progress: Progress) -> None:
    """Install the Debian packages of ``commands`` not on the ``PATH`` (as root only);
    ``apt-get update`` runs first only if a plain install fails."""
    missing = [APT_PACKAGES[c] for c in commands if shutil.which(c) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(f"{', '.join(missing)} missing (as root: apt-get install {missing})")
    progress(f"installing {' '.join(missing)} with apt-get")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ([install], [["apt-get", "update", "-qq"], install]):
        if all(_quiet(argv, env) for argv in attempt):
            return
    raise BenchError(f"apt-get could not install {' '.join(missing)}")


def _quiet(argv: list[str], env: dict[str, str]) -> bool:
    try:
        done = subprocess.run(argv, capture_output=True, env=env, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_litellm(peers_dir: Path, progress: Progress) -> str:
    """LiteLLM's version, pip-installing ``litellm[proxy]`` into its own venv on first use."""
    python = peers_dir / "litellm" / "bin" / "python"
    version = _venv_version(python, "litellm")
    if version is not None:
        return version
    progress(f"litellm: installing {LITELLM_PACKAGE} into {peers_dir / 'litellm'} (once)")
    peers_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    steps = [
        [sys.executable, "-m", "venv", str(peers_dir / "litellm")],
        [str(python), "-m", "pip", "install", "--quiet", LITELLM_PACKAGE],
    ]
    if not all(_quiet(argv, env) for argv in steps):
        raise BenchError(f"cannot install {LITELLM_PACKAGE} into {peers_dir / 'litellm'}")
    version = _venv_version(python, "litellm")
    if version is None:
        raise BenchError("litellm installed but its version cannot be read")
    return version


def _venv_version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    code = f"from importlib.metadata import version; print(version({package!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def tool_version(argv: list[str]) -> str:
    """The first line a ``-v`` style command prints (on stdout or stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].split(" - ")[0].strip() if lines else "unknown"


def wait_serving(target: Target, timeout_s: float) -> None:
    """Return once the benchmark's POST through ``target`` answers 200; :class:`BenchError` if
    the process exits or ``timeout_s`` passes first (routers may listen before their workers
    are registered)."""
    # No ProxyHandler: an http_proxy in the environment must not capture loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        target.url, data=BODY, headers={"Content-Type": "application/json"}, method="POST"
    )
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if target.service is not None and target.service.process.poll() is not None:
            raise BenchError(f"{target.name} exited:\n{target.service.log()}")
        try:
            with opener.open(request, timeout=5.0) as response:
                if response.status == 200:
                    return
                last = f"status {response.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise BenchError(f"{target.name} does not answer 200 after {timeout_s:g}s ({last})")


def start(
    name: str,
    argv: list[str],
    port: int,
    tmp: Path,
    services: list[Service],
    placement: str,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Target:
    """Start ``argv`` as ``name``, wait until it serves on ``port``; stop it again if not."""
    service = Service(name, argv, tmp / f"{name}.log", ROOT)
    services.append(service)
    target = Target(name, port, service, placement)
    try:
        service.wait_ready([port], timeout_s=ready_timeout_s)
        wait_serving(target, ready_timeout_s)
    except BenchError:
        service.process.kill()  # leave the CPU to the other proxies
        service.process.wait()
        raise
    return target


def start_lb(
    tmp: Path,
    prefix: list[str],
    backend_ports: list[int],
    workers: int,
    services: list[Service],
    placement: str,
) -> Target:
    """lb from this repository, with ``workers`` processes (1: a single process)."""
    port, admin_port = free_ports(2)
    name = "lb" if workers == 1 else f"lb-workers{workers}"
    config = lb_config(port, admin_port, backend_ports)
    path = tmp / f"{name}.yaml"
    path.write_text(config)
    argv = [*prefix, sys.executable, "-m", "lb", "--config", str(path), "--log-level", "warning"]
    argv += ["--workers", str(workers)]
    target = start(name, argv, port, tmp, services, placement)
    target.admin_port = admin_port
    target.configs[path.name] = config
    return target


def start_nginx(
    tmp: Path, prefix: list[str], backend_ports: list[int], services: list[Service]
) -> Target:
    """nginx in the foreground with one worker process."""
    (port,) = free_ports(1)
    config = nginx_conf(port, backend_ports, tmp, "root" if os.geteuid() == 0 else None)
    path = tmp / "nginx.conf"
    path.write_text(config)
    argv = [*prefix, "nginx", "-p", str(tmp), "-e", str(tmp / "nginx-startup.log")]
    argv += ["-c", str(path)]
    target = start("nginx", argv, port, tmp, services, "CPU 1 (master and 1 worker)")
    target.configs[path.name] = config
    return target


def start_haproxy(
    tmp: Path, prefix: list[str], backend_ports: list[int], services: list[Service]
) -> Target:
    """HAProxy in the foreground (``-db``), one process with one thread."""
    (port,) = free_ports(1)
    config = haproxy_cfg(port, backend_ports)
    path = tmp / "haproxy.cfg"
    path.write_text(config)
    argv = [*prefix, "haproxy", "-db", "-f", str(path)]
    target = start("haproxy", argv, port, tmp, services, "CPU 1 (1 thread)")
    target.configs[path.name] = config
    return target


def start_router(
    name: str,
    tmp: Path,
    prefix: list[str],
    backend_ports: list[int],
    peers_dir: Path,
    services: list[Service],
    progress: Progress,
) -> tuple[Target, str]:
    """vllm-router or sglang-router with round robin, from its venv under ``peers_dir``;
    returns the target and the installed version."""
    spec = ROUTERS[name]
    version = ensure_peer(spec, peers_dir, True, progress)
    port, metrics_port = free_ports(2)
    urls = [f"http://{HOST}:{p}" for p in backend_ports]
    argv = [*prefix, *spec.argv(spec.venv(peers_dir), port, metrics_port, urls)]
    return start(name, argv, port, tmp, services, "CPU 1 (all threads)"), version


def start_litellm(
    tmp: Path,
    prefix: list[str],
    backend_ports: list[int],
    peers_dir: Path,
    services: list[Service],
    progress: Progress,
) -> tuple[Target, str]:
    """LiteLLM's proxy (one uvicorn worker) from its venv; returns the target and version."""
    version = ensure_litellm(peers_dir, progress)
    (port,) = free_ports(1)
    config = litellm_config(backend_ports)
    path = tmp / "litellm.yaml"
    path.write_text(config)
    env = [f"{key}={value}" for key, value in LITELLM_ENV.items()]
    argv = [*prefix, "env", *env, str(peers_dir / "litellm" / "bin" / "litellm")]
    argv += ["--config", str(path), "--host", HOST, "--port", str(port), "--num_workers", "1"]
    target = start("litellm", argv, port, tmp, services, "CPU 1", LITELLM_READY_TIMEOUT_S)
    target.configs[path.name] = config
    return target, version
