"""Several worker processes behind one port (``lb --workers N``), run by a supervisor.

The data plane is one event loop, so one process uses one core. With N workers:

- **Workers** are ``python -m lb`` processes, started with ``subprocess`` (never ``fork``:
  forking a process with a running event loop copies its loop, sockets and threads). Each one
  builds the whole data plane from the config file and binds the client listener with
  ``SO_REUSEPORT``: the kernel spreads new connections over the workers' accept queues by a hash
  of the connection, with no lock, no shared accept socket and no handing of descriptors
  around. A connection stays on the worker that accepted it, so keep-alive and streams need no
  coordination. Shared-nothing has costs, stated: each worker probes every backend and scrapes
  its load report (N times the probes; fine for N up to the core count) and keeps its own
  counts, so ``max_concurrency``, admission queues, outlier detection and ``least_*``
  strategies see one worker's share of the traffic. Per-connection balancing by the kernel is
  even for many connections; a handful of long-lived connections can land unevenly.
- The **supervisor** is the process that was started. It validates the config, binds the
  public admin listener and starts the workers. It serves no client traffic, so it never
  competes with them for a core. Each worker runs its admin app on a private loopback port
  which it reports over a Unix socket inherited from the supervisor (:mod:`lb.worker_link`);
  the supervisor answers the public admin paths by asking every worker and merging
  (:mod:`lb.worker_admin`). A worker binds the client port only after the supervisor has
  replayed drains and weights set at run time, so a restarted worker does not route to a
  drained backend even once.
- **Signals**: SIGTERM or SIGINT make ``/readyz`` 503 and are passed on as SIGTERM, so every
  worker drains as a single proxy does; the supervisor waits ``shutdown.grace_s`` plus
  :data:`SHUTDOWN_MARGIN_S`, kills what is left and exits 0. A second signal is passed on too,
  cutting the workers' grace short. SIGHUP is checked by the supervisor (and logged) and
  passed on: each worker reloads and validates the file itself. Workers run in their own
  session, so a terminal's Ctrl-C reaches only the supervisor (a worker receiving SIGINT from
  the terminal and SIGTERM from the supervisor would take it as a second signal).
- **Crashes**: a worker that exits unexpectedly is restarted after a back-off of 0.5 s,
  doubling up to 10 s, back to 0.5 s once a worker has lived 30 s (:class:`Backoff`).
- **No orphans**: a worker treats end-of-file on its supervisor socket as the supervisor's
  death (the kernel closes the socket even on SIGKILL) and drains and exits.

``--workers 1`` (the default) is the single process of :mod:`lb.app`, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from lb.app import check_listeners_unchanged
from lb.build import build_pools
from lb.config import Config, ConfigError, admin_token, host_port, load_config
from lb.health import HealthChecker
from lb.load_report import LoadReporter
from lb.logs import reload_level, setup_logging
from lb.worker_admin import Member, Overrides, make_fleet_admin_app

if TYPE_CHECKING:
    from lb.proxy import Proxy

log = logging.getLogger("lb.workers")

START_TIMEOUT_S = 30.0  # from exec to "serving": imports, building pools, binding
SHUTDOWN_MARGIN_S = 5.0  # beyond shutdown.grace_s, before leftover workers are killed
KILL_WAIT_S = 5.0


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, so ``taskset`` and cpusets count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(requested: int) -> int:
    """The number of workers to run: ``requested``, or one per CPU when it is 0."""
    return requested if requested > 0 else cpu_count()


class Backoff:
    """Delays before restarting a worker: ``first_s``, doubling up to ``max_s``; back to
    ``first_s`` when the worker that exited had lived ``reset_after_s`` or longer."""

    def __init__(
        self, first_s: float = 0.5, max_s: float = 10.0, reset_after_s: float = 30.0
    ) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.reset_after_s = reset_after_s
        self._next_s = first_s

    def delay(self, uptime_s: float) -> float:
        """The delay before the next start, given how long the last one lived."""
        if uptime_s >= self.reset_after_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self._next_s * 2, self.max_s)
        return delay


class WorkerStartError(Exception):
    """A worker exited or misbehaved before it was serving."""


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Starts, watches and stops the workers, and serves the public admin listener.

    It is the admin API's :class:`~lb.admin_api.Control` (for the token check) and the
    :class:`~lb.worker_admin.Fleet` its handlers ask.
    """

    proxy: Proxy | None = None  # the supervisor runs no data plane

    def __init__(
        self, config: Config, source: str, count: int, log_level: str | None = None
    ) -> None:
        self.config = config
        self.source = source
        self.log_level = log_level
        self.members = [Member(i) for i in range(count)]
        self.overrides = Overrides()
        self.last_reload_error: str | None = None  # why the last refused reload was refused
        self.draining = False
        self.started_epoch_s = time.time()
        # The workers check and scrape the backends; the supervisor's admin API asks them.
        self.health_checkers: dict[str, HealthChecker] = {}
        self.load_reporters: dict[str, LoadReporter] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, asyncio.StreamWriter] = {}
        self._keepers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._admin: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()

    # -- Control and Fleet -------------------------------------------------------------------

    def admin_token(self) -> str | None:
        return admin_token(self.config)

    def validate(self) -> Config | None:
        try:
            config = load_config(self.source)
            check_listeners_unchanged(self.config, config, self.source)
            for pool in build_pools(config, self.source).values():
                pool.close()
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            for line in str(exc).splitlines():
                log.error("reload refused, keeping the running config: %s", line)
            return None
        if config.workers != self.config.workers:
            log.warning("workers changed in %s: restart to apply it", self.source)
        return config

    def accepted(self, config: Config) -> None:
        self.config = config
        self.overrides.after_reload(config)

    async def reload(self) -> bool:
        """SIGHUP: check the file here (and log), pass SIGHUP on to every serving worker."""
        config = self.validate()
        for m in self.members:
            proc = self._procs.get(m.index)
            if m.serving and proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGHUP)
        if config is None:
            return False
        self.accepted(config)
        reload_level(config.log_level)
        log.info("config %s valid: reload sent to the workers", self.source)
        return True

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> bool:
        """Bind the admin listener and start every worker; ``False`` (everything stopped, the
        reason logged) if the port cannot be bound or a worker does not start."""
        self._session = aiohttp.ClientSession()
        admin = self.config.admin
        if admin.enabled:
            self._admin = web.AppRunner(make_fleet_admin_app(self, self._session), access_log=None)
            await self._admin.setup()
            try:
                await web.TCPSite(self._admin, admin.host, admin.port).start()
            except OSError as exc:
                where = host_port(admin.host, admin.port)
                log.error("cannot listen: admin %s: %s", where, exc.strerror or exc)
                await self._close()
                return False
        results = await asyncio.gather(
            *(self._spawn(m) for m in self.members), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for error in failed:
                log.error("%s", error)
            self._stopping.set()
            self._signal_all(signal.SIGTERM)
            await self._reap(KILL_WAIT_S)
            await self._close()
            return False
        for m, proc in zip(self.members, results, strict=True):
            assert isinstance(proc, asyncio.subprocess.Process)
            self._keepers.append(asyncio.create_task(self._keep(m, proc)))
        listen = self.config.listen
        log.info(
            "%d workers listening on http://%s, admin on %s",
            len(self.members),
            host_port(listen.host, listen.port),
            f"http://{host_port(admin.host, admin.port)}" if admin.enabled else "(disabled)",
        )
        return True

    def _argv(self, member: Member, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "lb", "--config", self.source]
        argv += ["--worker-index", str(member.index), "--worker-fd", str(fd)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        return argv

    async def _spawn(self, member: Member) -> asyncio.subprocess.Process:
        """Start the worker for ``member`` and see it serving; raises
        :class:`WorkerStartError` (the process then gone) if it does not."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(member, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the supervisor only
            )
        except OSError as exc:
            ours.close()
            raise WorkerStartError(f"cannot start worker {member.index}: {exc}") from None
        finally:
            theirs.close()
        self._procs[member.index] = proc
        member.pid = proc.pid
        if self._stopping.is_set():  # a shutdown began while this one was being started
            proc.send_signal(signal.SIGTERM)
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                word, _, port = (await reader.readline()).decode().partition(" ")
                if word != "admin":
                    raise WorkerStartError("no admin port reported")
                member.admin_port = int(port)
                assert self._session is not None
                await self.overrides.replay(self._session, member.admin_port, self.admin_token())
                writer.write(b"serve\n")
                await writer.drain()
                if (await reader.readline()).strip() != b"serving":
                    raise WorkerStartError("it did not report serving")
        except (WorkerStartError, TimeoutError, ValueError, OSError) as exc:
            writer.close()
            member.admin_port = None
            if proc.returncode is None:
                proc.kill()
            code = await proc.wait()
            raise WorkerStartError(
                f"worker {member.index} (pid {proc.pid}) did not start ({_describe_exit(code)}"
                f"{'' if isinstance(exc, WorkerStartError) else f', {exc!r}'})"
            ) from None
        self._links[member.index] = writer  # kept open: its end-of-file stops the worker
        member.serving = True
        member.started_epoch_s = time.time()
        return proc

    async def _keep(self, member: Member, proc: asyncio.subprocess.Process) -> None:
        """Restart ``member``'s worker whenever it exits, until shutdown."""
        backoff = Backoff()
        while True:
            code = await proc.wait()
            uptime_s = time.time() - member.started_epoch_s
            member.serving = False
            member.admin_port = None
            link = self._links.pop(member.index, None)
            if link is not None:
                link.close()
            if self._stopping.is_set():
                return
            delay = backoff.delay(uptime_s)
            log.error(
                "worker %d (pid %s) exited (%s) after %.1fs; restarting in %.1fs",
                member.index, proc.pid, _describe_exit(code), uptime_s, delay,
            )  # fmt: skip
            while True:
                if await self._stopped_within(delay):
                    return
                member.restarts += 1
                try:
                    proc = await self._spawn(member)
                except WorkerStartError as exc:
                    if self._stopping.is_set():
                        return
                    delay = backoff.delay(0.0)
                    log.error("%s; retrying in %.1fs", exc, delay)
                    continue
                log.info("worker %d restarted (pid %d)", member.index, proc.pid)
                break

    async def _stopped_within(self, delay_s: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), delay_s)
        except TimeoutError:
            return False
        return True

    def _signal_all(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _reap(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for every worker to exit, then kill the rest."""
        running = [p for p in self._procs.values() if p.returncode is None]
        if not running:
            return
        _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running],
                                     timeout=timeout_s)  # fmt: skip
        if late:
            log.warning("killing %d workers still running", len(late))
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(late, timeout=KILL_WAIT_S)

    async def shutdown(self) -> None:
        """Drain every worker and stop; a second call passes SIGTERM on again, which cuts
        the workers' grace period short."""
        if self._stopping.is_set():
            self._signal_all(signal.SIGTERM)
            await self._stopped.wait()
            return
        self._stopping.set()
        self.draining = True
        grace_s = self.config.shutdown.grace_s
        log.info("draining %d workers, grace %gs", len(self._procs), grace_s)
        self._signal_all(signal.SIGTERM)
        await self._reap(grace_s + SHUTDOWN_MARGIN_S)
        if self._keepers:
            await asyncio.wait(self._keepers, timeout=KILL_WAIT_S)
        for task in self._keepers:
            task.cancel()
        await self._close()
        log.info("stopped")
        self._stopped.set()

    async def _close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._session is not None:
            await self._session.close()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def supervise_async(config: Config, source: str, count: int, log_level: str | None) -> int:
    """Run the supervisor until SIGTERM or SIGINT; returns the exit code."""
    supervisor = Supervisor(config, source, count, log_level)
    if not await supervisor.start():
        return 1
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[object]] = set()

    def spawn(coro: Coroutine[Any, Any, object]) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_signal(signum: int) -> None:
        log.info("received %s", signal.Signals(signum).name)
        spawn(supervisor.shutdown())

    def on_hangup() -> None:
        log.info("received SIGHUP: checking %s and passing it on", source)
        spawn(supervisor.reload())

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await supervisor.wait_stopped()
    return 0


def supervise(config: Config, source: str, count: int, log_level: str | None = None) -> int:
    """Entry point used by the CLI for ``count`` > 1 workers; returns the exit code.

    ``log_level`` (the command line's override, if any) is passed on to the workers.
    """
    setup_logging(config.log_level, config.log_format, pinned=log_level is not None)
    import uvloop

    return int(uvloop.run(supervise_async(config, source, count, log_level)))
