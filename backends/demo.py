"""``make run``: the simulated model servers named in a config file, and the proxy in front.

Starts one ``backends.sim`` process serving every backend of the config that lives on this
machine, waits until it listens, starts ``lb`` on the same config, prints the proxy's URL and a
curl line that gets an answer through it, and on Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time

from lb.config import ConfigError, load_config

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
START_TIMEOUT_S = 20.0


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout_s:g}s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.demo", description=__doc__)
    parser.add_argument("--config", default="config.yaml")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"lb: {exc}", file=sys.stderr)
        return 2
    ports = sorted(
        {
            int(b.url.rsplit(":", 1)[1].strip("/"))
            for p in config.pools
            for b in p.backends
            if b.url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]") in LOCAL_HOSTS
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    # SIGINT from the terminal reaches the children too; all we do is wait and clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if ports:
            sim_args = [a for port in ports for a in ("--port", str(port))]
            procs.append(subprocess.Popen([sys.executable, "-m", "backends.sim", *sim_args]))
            for port in ports:
                _wait_for_port("127.0.0.1", port, procs[0], START_TIMEOUT_S)
        procs.append(subprocess.Popen([sys.executable, "-m", "lb", "--config", args.config]))
        host = config.listen.host if config.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
        _wait_for_port(host, config.listen.port, procs[-1], START_TIMEOUT_S)
        base = f"http://{host}:{config.listen.port}"
        admin = f"http://{config.admin.host}:{config.admin.port}"
        print(
            f"\nlb is up: {base}   (metrics: {admin}/metrics)\n"
            f"try:\n  curl -s {base}/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"model": "sim-model", "messages": [{"role": "user", "content": '
            '"Hello!"}]}\'\n'
            f"  curl -sN {base}/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"model": "sim-model", "stream": true, "max_tokens": 8, '
            '"messages": [{"role": "user", "content": "Hello!"}]}\'\n'
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        failed = [p for p in procs if p.returncode not in (None, 0)]
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(procs)


if __name__ == "__main__":
    sys.exit(main())
