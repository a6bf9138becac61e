"""Tests for the ``lb`` command line, run as ``python -m lb`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 127.0.0.1, port: 9901}
pools:
  - name: chat
    strategy: least_connections
    backends:
      - url: http://127.0.0.1:8001
      - url: http://127.0.0.1:8002
        weight: 2
routes:
  - path_prefix: /v1/
    pool: chat
"""

SUMMARY = """\
config.yaml: OK
listen 127.0.0.1:8080, admin 127.0.0.1:9901
pool chat (least_connections): 2 backends
  127.0.0.1:8001  http://127.0.0.1:8001  weight 1
  127.0.0.1:8002  http://127.0.0.1:8002  weight 2
route route-0: /v1/ -> chat
"""

ONE_POOL = """\
pools:
  - name: chat
    backends:
      - url: http://127.0.0.1:8001
"""


def run_lb(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lb`` in ``cwd`` with the repository importable."""
    environ = {k: v for k, v in os.environ.items() if k != "LB_CONFIG"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lb", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_prints_a_summary_of_a_good_file(tmp_path: Path) -> None:
    """``lb check`` on a valid file exits 0 and prints listeners, pools, backends and routes."""
    (tmp_path / "config.yaml").write_text(GOOD, encoding="utf-8")
    result = run_lb(tmp_path, "check", "--config", "config.yaml")
    assert (result.returncode, result.stdout, result.stderr) == (0, SUMMARY, "")


def test_check_reads_the_file_named_by_lb_config(tmp_path: Path) -> None:
    """Without --config the path comes from $LB_CONFIG."""
    (tmp_path / "other.yaml").write_text(GOOD, encoding="utf-8")
    result = run_lb(tmp_path, "check", env={"LB_CONFIG": "other.yaml"})
    assert result.returncode == 0
    assert result.stdout.startswith("other.yaml: OK\n")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        pytest.param("pools: [\n", "", "invalid YAML at line 2, column 1", id="bad-yaml"),
        pytest.param("", "", "file is empty", id="empty-file"),
        pytest.param(
            ONE_POOL + "    strategy: consistent_hash\n"
            "    strategy_options: {virtual_nodes: 1000000000}\n",
            "pools[0].strategy",
            "option 'virtual_nodes' for strategy 'consistent_hash' must be at most 10000",
            id="consistent-hash-ring-too-large",
        ),
        pytest.param(ONE_POOL + "lisen: {}\n", "lisen", "unknown key 'lisen'", id="unknown-key"),
        pytest.param(
            ONE_POOL + "        wieght: 2\n",
            "pools[0].backends[0].wieght",
            "unknown key 'wieght'",
            id="unknown-nested-key",
        ),
        pytest.param(
            ONE_POOL + "        weight: heavy\n",
            "pools[0].backends[0].weight",
            "Input should be a valid integer",
            id="wrong-type",
        ),
        pytest.param(
            ONE_POOL + "  - name: chat\n    backends: [{url: 'http://b'}]\n",
            "pools[1].name",
            "duplicate pool name 'chat'",
            id="duplicate-pool",
        ),
        pytest.param(
            ONE_POOL + "      - url: http://127.0.0.1:8001\n",
            "pools[0].backends[1].url",
            "duplicate backend 'http://127.0.0.1:8001'",
            id="duplicate-backend",
        ),
        pytest.param(
            ONE_POOL + "routes: [{pool: embed}]\n",
            "routes[0].pool",
            "no pool named 'embed' (pools: chat)",
            id="route-to-missing-pool",
        ),
        pytest.param(
            ONE_POOL.replace("http://", ""),
            "pools[0].backends[0].url",
            "URL must start with http:// or https://",
            id="url-without-scheme",
        ),
        pytest.param(
            ONE_POOL.replace("http://", "ftp://"),
            "pools[0].backends[0].url",
            "URL must start with http:// or https://",
            id="ftp-url",
        ),
        pytest.param(
            ONE_POOL.replace(":8001", ":8001/v1"),
            "pools[0].backends[0].url",
            "URL must not have a path",
            id="url-with-path",
        ),
        pytest.param(
            ONE_POOL.replace(":8001", ":80001"),
            "pools[0].backends[0].url",
            "URL port must be an integer 1..65535",
            id="url-port-out-of-range",
        ),
        pytest.param(
            ONE_POOL + "listen: {port: 70000}\n",
            "listen.port",
            "Input should be less than or equal to 65535 (got 70000)",
            id="listen-port-out-of-range",
        ),
        pytest.param(
            ONE_POOL.replace("127.0.0.1", "${LB_TEST_UNDEFINED}"),
            "pools[0].backends[0].url",
            "environment variable LB_TEST_UNDEFINED is not set",
            id="undefined-env-var",
        ),
        pytest.param(
            ONE_POOL + "    strategy: no_such_strategy\n",
            "pools[0].strategy",
            "",
            id="unknown-strategy",
        ),
        pytest.param(
            ONE_POOL + "    strategy: tests.strategies.custom_strategy:FirstBackend\n"
            "    strategy_options: {decay_s: abc}\n",
            "pools[0].strategy_options.decay_s",
            "must be a positive number of seconds (got 'abc')",
            id="user-strategy-decay-not-a-number",
        ),
        pytest.param(
            ONE_POOL + "    strategy: tests.strategies.custom_strategy:FirstBackend\n"
            "    strategy_options: {decay_s: 0}\n",
            "pools[0].strategy_options.decay_s",
            "must be a positive number of seconds (got 0)",
            id="user-strategy-decay-zero",
        ),
        pytest.param(
            ONE_POOL + "    strategy: least_connections\n    strategy_options: {decay_s: .inf}\n",
            "pools[0].strategy_options.decay_s",
            "must be a positive number of seconds (got inf)",
            id="least-connections-decay-infinite",
        ),
    ],
)
def test_check_reports_a_bad_file_with_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    """``lb check`` on an invalid file exits 2 naming file, key path and reason, no traceback."""
    (tmp_path / "config.yaml").write_text(text, encoding="utf-8")
    result = run_lb(tmp_path, "check", "--config", "config.yaml")
    assert result.returncode == 2
    assert result.stdout == ""
    prefix = f"lb: config.yaml: {key}: " if key else "lb: config.yaml: "
    assert result.stderr.startswith(prefix + reason), result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    """``lb check`` on a path that does not exist exits 2 with the file name and reason."""
    result = run_lb(tmp_path, "check", "--config", "absent.yaml")
    assert result.returncode == 2
    assert result.stderr == "lb: absent.yaml: cannot read file: No such file or directory\n"


def test_run_with_an_invalid_file_exits_2_before_starting(tmp_path: Path) -> None:
    """Plain ``lb`` (run) reports a bad config.yaml the same way and does not start."""
    (tmp_path / "config.yaml").write_text(ONE_POOL + "bogus: 1\n", encoding="utf-8")
    result = run_lb(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("lb: config.yaml: bogus: unknown key 'bogus'")
    assert "Traceback" not in result.stderr


def test_schema_prints_the_json_schema(tmp_path: Path) -> None:
    """``lb schema`` prints a JSON schema whose properties include pools."""
    result = run_lb(tmp_path, "schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "pools" in schema["properties"]
    assert schema["required"] == ["pools"]


@pytest.mark.parametrize(
    ("args", "env"),
    [(("check", "--config", ""), {}), (("check",), {"LB_CONFIG": ""})],
    ids=["flag", "environment"],
)
def test_an_empty_config_path_is_an_error_not_the_default_file(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    """``--config "$FILE"`` with FILE unset must not quietly run ./config.yaml instead."""
    (tmp_path / "config.yaml").write_text(GOOD, encoding="utf-8")
    result = run_lb(tmp_path, *args, env=env)
    assert result.returncode == 2
    assert "configuration file named is empty" in result.stderr
    assert "OK" not in result.stdout


@pytest.mark.parametrize("count", ["-1", "1025", "99999999999999999999999", "many"])
def test_a_worker_count_out_of_range_is_refused_by_the_command_line(
    tmp_path: Path, count: str
) -> None:
    (tmp_path / "config.yaml").write_text(GOOD, encoding="utf-8")
    result = run_lb(tmp_path, "--workers", count, "check")
    assert result.returncode == 2
    assert "expected a number from 0 to 1024" in result.stderr


def test_check_describes_split_mirror_and_model_routes(tmp_path: Path) -> None:
    """Every route's summary says where it sends: a split's pools and weights, a mirror, the
    models it matches (not "None", not a catch-all)."""
    pools = (
        "pools:\n"
        "  - {name: a, backends: [{url: 'http://127.0.0.1:8001'}]}\n"
        "  - {name: b, backends: [{url: 'http://127.0.0.1:8002'}]}\n"
    )
    routes = (
        "routes:\n"
        "  - path_prefix: /v1\n"
        "    split: [{pool: a, weight: 90}, {pool: b, weight: 10}]\n"
        "    mirror: {pool: b, percent: 5}\n"
        "  - {model: llama, pool: b}\n"
    )
    (tmp_path / "config.yaml").write_text(pools + routes, encoding="utf-8")
    result = run_lb(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    assert "route route-0: /v1 -> a:90 b:10 (mirror b 5%)\n" in result.stdout
    assert "route route-1: / model=llama -> b\n" in result.stdout
