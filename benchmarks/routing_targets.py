"""What the routing benchmark starts: the simulated fleet, one lb per strategy, the peer routers.

Every process is a :class:`~benchmarks.processes.Service` appended to the caller's list as soon
as it exists, so the caller's ``finally`` stops it whatever happens next. The fleet is one
``python -m backends.sim`` process per replica, so each replica has an event loop of its own,
as separate servers would. Peers (sglang-router, vllm-router) live in their own virtual
environments under ``--peers-dir``, installed there with pip on first use; a peer that cannot
be installed or will not serve is skipped with a note, never fatal.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.processes import HOST, BenchError, Service, free_ports

ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str], None]
INSTALL_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class SimKnobs:
    """Engine knobs of every replica (``python -m backends.sim --help``).

    Defaults: prefill 0.2 ms per uncached prompt token on top of a 20 ms base, 5 ms per output
    token (batch of 1), batches of 16, blocks of 16 tokens and a prefix cache of 384 blocks
    (6,144 tokens: about eight 3,000-character system prompts, or four and their chats).
    """

    prefill_ms_per_token: float = 0.2
    ttft_ms: float = 20.0
    decode_ms: float = 5.0
    max_batch: int = 16
    block_size: int = 16
    cache_capacity_blocks: int = 384

    def argv(self) -> list[str]:
        return [
            "--prefill-ms-per-token", str(self.prefill_ms_per_token),
            "--ttft-ms", str(self.ttft_ms),
            "--decode-ms", str(self.decode_ms),
            "--max-batch", str(self.max_batch),
            "--block-size", str(self.block_size),
            "--cache-capacity-blocks", str(self.cache_capacity_blocks),
        ]  # fmt: skip


class Fleet:
    """The replicas and their control endpoints: ``/sim/stats``, ``/sim/reset``, ``/sim/engine``."""

    def __init__(self, ports: list[int], services: list[Service]) -> None:
        self.ports = ports
        self.services = services

    @property
    def urls(self) -> list[str]:
        return [f"http://{HOST}:{port}" for port in self.ports]

    @property
    def names(self) -> list[str]:
        return [f"sim-{port}" for port in self.ports]

    async def _each(
        self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> list[dict[str, Any]]:
        async def one(url: str) -> dict[str, Any]:
            async with session.request(method, url + path, json=body) as response:
                if response.status != 200:
                    raise BenchError(f"{method} {url}{path}: status {response.status}")
                data: dict[str, Any] = await response.json()
                return data

        return list(await asyncio.gather(*(one(url) for url in self.urls)))

    async def stats(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every replica's ``/sim/stats``, in fleet order."""
        return await self._each(session, "GET", "/sim/stats")

    async def reset(self, session: aiohttp.ClientSession) -> None:
        """Zero every replica's counters and empty its prefix cache."""
        await self._each(session, "POST", "/sim/reset", {"clear_cache": True})

    async def set_speeds(self, session: aiohttp.ClientSession, speeds: list[float]) -> None:
        """Set each replica's speed multiplier (1.0 normal, 0.5 half as fast)."""
        for url, speed in zip(self.urls, speeds, strict=True):
            async with session.post(url + "/sim/engine", json={"speed": speed}) as response:
                if response.status != 200:
                    raise BenchError(f"{url}/sim/engine: status {response.status}")

    async def wait_idle(self, session: aiohttp.ClientSession, timeout_s: float = 15.0) -> bool:
        """Wait until no replica runs or queues a sequence; ``False`` if ``timeout_s`` passed."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            stats = await self.stats(session)
            if all(s["running"] == 0 and s["waiting"] == 0 for s in stats):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.1)


def start_fleet(
    tmp: Path, replicas: int, knobs: SimKnobs, services: list[Service], progress: Progress
) -> Fleet:
    """One ``backends.sim`` process per replica, all with ``knobs``."""
    ports = free_ports(replicas)
    own: list[Service] = []
    for port in ports:
        argv = [sys.executable, "-m", "backends.sim", "--port", str(port), *knobs.argv()]
        service = Service(f"sim-{port}", argv, tmp / f"sim-{port}.log", ROOT)
        services.append(service)
        own.append(service)
    for port, service in zip(ports, own, strict=True):
        service.wait_ready([port])
    progress(f"fleet: {replicas} simulated replicas on ports {ports}")
    return Fleet(ports, own)


@dataclass(frozen=True)
class Target:
    """A router in front of the fleet: an lb process with one strategy, or a peer router."""

    name: str
    port: int
    service: Service
    admin_port: int | None = None  # lb only


# lb targets that run a strategy with options, by target name: (strategy, strategy_options).
LB_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "least_loaded+prefix": ("least_loaded", {"prefix_weight": 1.0}),
}


def lb_pool(label: str, urls: list[str]) -> dict[str, Any]:
    """The pool of the lb target ``label`` (a strategy, or a name in :data:`LB_VARIANTS`):
    library defaults, plus what the strategy needs."""
    strategy, options = LB_VARIANTS.get(label, (label, {}))
    pool: dict[str, Any] = {
        "name": "fleet",
        "strategy": strategy,
        "backends": [{"url": url} for url in urls],
    }
    if strategy == "consistent_hash":
        options = {"key": "prompt", "prefix_tokens": 256, **options}
    if options:
        pool["strategy_options"] = options
    if strategy in ("least_loaded", "cache_aware"):
        # Both read the replicas' own queues (cache_aware to spread a saturated prefix).
        pool["load_report"] = {"enabled": True}
    return pool


def start_lb(
    tmp: Path, strategy: str, urls: list[str], services: list[Service], progress: Progress
) -> Target:
    port, admin_port = free_ports(2)
    config = {
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "pools": [lb_pool(strategy, urls)],
        # The peers log at warn level, nothing per request; lb's access log is off to match.
        "access_log": {"enabled": False},
        "shutdown": {"grace_s": 1},
    }
    path = tmp / f"lb-{strategy}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "lb", "--config", str(path), "--log-level", "warning"]
    service = Service(f"lb {strategy}", argv, tmp / f"lb-{strategy}.log", ROOT)
    services.append(service)
    service.wait_ready([port, admin_port])
    progress(f"lb {strategy} on port {port} (admin {admin_port}, pid {service.pid})")
    return Target(f"lb {strategy}", port, service, admin_port)


@dataclass(frozen=True)
class PeerSpec:
    """A peer router: its PyPI package, how to start it, and the policy it runs."""

    name: str
    package: str
    policy: str

    def venv(self, peers_dir: Path) -> Path:
        return peers_dir / self.package

    def argv(self, venv: Path, port: int, metrics_port: int, urls: list[str]) -> list[str]:
        common = [
            "--host", HOST, "--port", str(port), "--worker-urls", *urls,
            "--policy", self.policy,
            "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
        ]  # fmt: skip
        if self.package == "sglang-router":
            launch = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
            return [*launch, *common, "--log-level", "warn"]
        return [str(venv / "bin" / "vllm-router"), *common, "--log-level", "warning"]


PEERS = (
    PeerSpec("sglang-router", "sglang-router", "cache_aware"),
    PeerSpec("vllm-router", "vllm-router", "cache_aware"),
)
# What each peer asks of the workers, as seen with a stub worker logging every request
# (sglang-router 0.3.2, vllm-router 0.1.17).
PEER_NEEDS = {
    "sglang-router": (
        "starts and routes. At registration it probes GET /health, tries HTTP/2 (gRPC "
        "detection), then GET /server_info, /get_server_info, /model_info, /get_model_info "
        "(404s are logged as warnings and tolerated; the worker's model is then 'unknown'). "
        "cache_aware matches on the request text, so it needs nothing more."
    ),
    "vllm-router": (
        "starts and routes. Its cache_aware matches token ids, which it asks the workers for: "
        "for every chat it sends POST /v1/chat/completions/render to every worker and reads "
        "the token_ids of the answer (vLLM's GenerateRequest), falling back to POST /tokenize "
        "({'count', 'max_model_len', 'tokens'}) when render fails, and to no prefix matching "
        "at all when both do ('Prefix input preparation unavailable' at debug level). The "
        "sims serve both with their own token ids, so its prefix matching runs; those "
        "requests are the 'extra upstream req/chat'. Its forwarded bodies gain logprobs, "
        "no_stop_trim, ignore_eos and continue_final_message fields, which the sims ignore."
    ),
}
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def peer_version(spec: PeerSpec, peers_dir: Path) -> str | None:
    """The installed version of the peer's package, or ``None`` if it is not installed."""
    python = spec.venv(peers_dir) / "bin" / "python"
    if not python.exists():
        return None
    code = f"from importlib.metadata import version; print(version({spec.package!r}))"
    try:
        done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_peer(spec: PeerSpec, peers_dir: Path, install: bool, progress: Progress) -> str:
    """The peer's version, installing it first if allowed; raise :class:`BenchError` if absent."""
    found = peer_version(spec, peers_dir)
    if found is not None:
        return found
    if not install:
        raise BenchError(f"not installed in {spec.venv(peers_dir)} (and --no-install-peers)")
    venv = spec.venv(peers_dir)
    progress(f"{spec.name}: installing {spec.package} into {venv} (once)")
    log = peers_dir / f"{spec.package}-install.log"
    peers_dir.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", spec.package],
    ]
    with log.open("w") as out:
        for argv in steps:
            try:
                done = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BenchError(f"cannot install {spec.package}: {exc}") from exc
            if done.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise BenchError(f"cannot install {spec.package}: {' / '.join(tail)}")
    version = peer_version(spec, peers_dir)
    if version is None:
        raise BenchError(f"{spec.package} installed but its version cannot be read")
    return version


def start_peer(
    tmp: Path,
    spec: PeerSpec,
    peers_dir: Path,
    urls: list[str],
    services: list[Service],
    progress: Progress,
) -> Target:
    port, metrics_port = free_ports(2)
    argv = spec.argv(spec.venv(peers_dir), port, metrics_port, urls)
    service = Service(spec.name, argv, tmp / f"{spec.package}.log", ROOT)
    services.append(service)
    service.wait_ready([port], timeout_s=READY_TIMEOUT_S)
    progress(f"{spec.name} ({spec.policy}) on port {port} (pid {service.pid})")
    return Target(f"{spec.name} {spec.policy}", port, service)


async def wait_serving(target: Target, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once a small chat through ``target`` answers 200; :class:`BenchError` if it does
    not within ``timeout_s`` (routers may listen before their workers are registered)."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    url = f"http://{HOST}:{target.port}/v1/chat/completions"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while loop.time() < deadline:
            if target.service.process.poll() is not None:
                raise BenchError(f"{target.name} exited:\n{target.service.log()}")
            try:
                async with session.post(url, json=body) as response:
                    if response.status == 200:
                        return
                    last = f"status {response.status}: {(await response.text())[:200]}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.25)
    raise BenchError(f"{target.name} does not serve chats after {timeout_s:g}s ({last})")


def start_targets(
    tmp: Path,
    strategies: list[str],
    peers_dir: Path | None,
    install_peers: bool,
    fleet: Fleet,
    services: list[Service],
    progress: Progress,
    notes: dict[str, str],
    versions: dict[str, str],
) -> dict[str, Target]:
    """One lb per strategy, then (unless ``peers_dir`` is ``None``) the peers that install and
    serve; a peer that does not is noted in ``notes`` and left out. Keyed by target name."""
    targets: dict[str, Target] = {}
    for strategy in strategies:
        target = start_lb(tmp, strategy, fleet.urls, services, progress)
        asyncio.run(wait_serving(target))
        targets[target.name] = target
    if peers_dir is None:
        return targets
    for spec in PEERS:
        try:
            versions[spec.name] = ensure_peer(spec, peers_dir, install_peers, progress)
            target = start_peer(tmp, spec, peers_dir, fleet.urls, services, progress)
            asyncio.run(wait_serving(target))
        except BenchError as exc:
            notes[spec.name] = f"skipped: {exc}"
            progress(f"{spec.name}: skipped: {exc}")
            continue
        notes[spec.name] = PEER_NEEDS[spec.name]
        targets[target.name] = target
    return targets


def log_summary(service: Service) -> dict[str, Any]:
    """What a router logged: a line count and the distinct warnings and errors (first 12).

    lb runs at warning level with its access log off, so any line of it counts; the peers'
    banners at info level are left out of the list.
    """
    text = ANSI_ESCAPE.sub("", service.log(max_chars=1_000_000))
    lines = [line for line in text.splitlines() if line.strip()]
    notable: list[str] = []
    for line in lines:
        if service.name.startswith("lb ") or re.search(r"WARN|ERROR|panic|Traceback", line):
            key = re.sub(r"^\S+ \S+\s+", "", line)  # without the timestamp
            if key not in notable:
                notable.append(key)
    return {"lines": len(lines), "notable": notable[:12]}
