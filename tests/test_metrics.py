"""The ``/metrics`` scrape and the monitoring files in ``deploy/`` built on it: exact counts
after known traffic, promtool's lint of a real scrape, the alert rules and their unit tests,
and the dashboard's queries, all checked against a real proxy with real aiohttp backends."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import lb
from lb.app import App
from lb.config import load_config
from lb.metrics import CODE_CLASSES
from tests.conftest import free_port, pool, proxy_config, raw_exchange, url

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
ALERTS_TEST = DEPLOY / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"

# Every metric lb exports starts with ``lb_``; in PromQL a name is never preceded by a word
# character, so this finds the metric names of an expression and nothing else.
METRIC_NAME = re.compile(r"(?<![\w:])lb_[A-Za-z0-9_:]*")
# A label value that looks like an IPv4 address, with or without a port.
ADDRESS = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
PROMTOOL_TIMEOUT_S = 60


def promtool() -> str:
    """The path of ``promtool``; fails the test (never skips it) when it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed, and these tests need it: install the Debian/Ubuntu "
            "package `prometheus` (apt-get install prometheus), which CI installs",
            pytrace=False,
        )
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        cwd=ROOT,
    )


async def run_promtool_async(*args: str, stdin: str) -> tuple[int, str]:
    """``promtool args`` fed ``stdin``: its exit code and its stdout and stderr together."""
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin.encode()), PROMTOOL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def scrape(session: aiohttp.ClientSession, app: Any) -> str:
    """The proxy's ``/metrics`` text."""
    async with session.get(f"http://127.0.0.1:{app.admin_port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        return await resp.text()


def series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by its name and labels."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The one sample called ``name`` with exactly ``labels``; fails if there is none."""
    key = (name, frozenset(labels.items()))
    found = series(text)
    assert key in found, f"no sample {name}{labels} in the scrape:\n{text}"
    return found[key]


def exported_names(text: str) -> set[str]:
    """Every sample name a scrape's ``# TYPE`` lines declare, with the suffixes of their type:
    ``_bucket``, ``_count`` and ``_sum`` for a histogram, ``_total`` for a counter (whether or
    not the TYPE line carries it), even for a family with no sample yet."""
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "histogram":
            names |= {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif kind == "summary":
            names |= {name, f"{name}_count", f"{name}_sum"}
        elif kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        else:
            names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    """The rules of deploy/alerts.yml, all groups together."""
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that is not a row, including those folded into collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [t["expr"] for p in dashboard_panels(board) for t in p["targets"]]


def variable_queries(board: dict[str, Any]) -> list[str]:
    """The queries of the dashboard's query variables (``label_values(...)``)."""
    out = []
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    for variable, replacement in (
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$pool", ".*"),
        ("$instance", ".*"),
    ):
        expr = expr.replace(variable, replacement)
    return expr


@pytest.fixture
def deploy_metric_names() -> dict[str, set[str]]:
    """The metric names each monitoring file queries, read before the event loop runs."""
    board = dashboard()
    return {
        "deploy/alerts.yml": {n for r in alert_rules() for n in METRIC_NAME.findall(r["expr"])},
        "deploy/grafana-dashboard.json": {
            n
            for q in dashboard_queries(board) + variable_queries(board)
            for n in METRIC_NAME.findall(q)
        },
    }


async def busy_scrape(backends: Any, start_proxy: Any) -> str:
    """A scrape of a proxy with two pools after traffic of every kind the tests can cause
    cheaply: 2xx, 4xx, a retried 5xx, and active health checks that have run."""
    b0, b1, b2 = await backends(3)
    fast_checks = {"interval_s": 0.05, "transition_interval_s": 0.05}
    app = await start_proxy(
        proxy_config(
            [
                pool("chat", [b0, b1], health_check=fast_checks),
                pool("embed", [b2], strategy="least_connections"),
            ],
            routes=[
                {"path_prefix": "/v1/embeddings", "pool": "embed"},
                {"path_prefix": "/", "pool": "chat"},
            ],
        )
    )
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/v1/embeddings", "/status/404", "/status/503"):
            async with s.get(url(app, path)) as resp:
                await resp.read()
        for _ in range(200):
            if b0.probes and b1.probes:
                break
            await asyncio.sleep(0.01)
        assert b0.probes and b1.probes, "the health checker never probed the backends"
        return await scrape(s, app)


async def test_a_scrape_counts_requests_by_pool_status_class_and_backend(backends, start_proxy):
    """Five 200s and two 503s without retries show as exact counts per pool, class and backend,
    a duration histogram of seven, nothing in flight, and the build info."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1], retry={"max_retries": 0})]))
    served: Counter[tuple[str, str]] = Counter()
    async with aiohttp.ClientSession() as s:
        for path in ["/"] * 5 + ["/status/503"] * 2:
            async with s.get(url(app, path)) as resp:
                await resp.read()
                served[(resp.headers["x-lb-backend"], f"{resp.status // 100}xx")] += 1
        text = await scrape(s, app)

    assert sum(served.values()) == 7
    expected = {"2xx": 5, "5xx": 2}
    for cls in CODE_CLASSES:
        assert value(text, "lb_requests_total", pool="chat", code_class=cls) == expected.get(cls, 0)
    for b in (b0, b1):
        for cls in CODE_CLASSES:
            got = value(
                text, "lb_upstream_responses_total", pool="chat", backend=b.name, code_class=cls
            )
            assert got == served[(b.name, cls)], (b.name, cls)
        assert value(text, "lb_upstream_in_flight", pool="chat", backend=b.name) == 0
    assert b0.hits + b1.hits == 7
    assert value(text, "lb_request_duration_seconds_count", pool="chat") == 7
    assert value(text, "lb_request_duration_seconds_bucket", pool="chat", le="+Inf") == 7
    assert value(text, "lb_request_duration_seconds_sum", pool="chat") > 0
    assert not [k for k in series(text) if k[0] == "lb_retries_total"]
    assert value(text, "lb_build_info", version=lb.__version__) == 1


async def test_the_latency_estimate_gauge_is_the_one_the_strategies_and_the_api_see(
    backends, start_proxy
):
    """A backend whose last slow answer was long ago has an estimate relaxed towards the
    default, as latency_weighted and the admin API read it: the gauge says that too, not the
    raw value frozen at that answer."""
    (b0,) = await backends(1)
    app = await start_proxy(proxy_config([pool("chat", [b0], "latency_weighted")]))
    chat = app.proxy.pools["chat"]
    backend = chat.backends[0]
    backend.rtt_estimate_s = 60.0
    backend.rtt_stamp_s = chat.clock() - 600.0
    async with aiohttp.ClientSession() as s:
        text = await scrape(s, app)
        async with s.get(
            f"http://127.0.0.1:{app.admin_port}/api/v1/pools/chat/backends/b0"
        ) as resp:
            shown = (await resp.json())["latency_estimate_s"]
    gauge = value(text, "lb_upstream_latency_estimate_seconds", pool="chat", backend="b0")
    assert gauge < 1.0
    assert gauge == pytest.approx(shown, rel=0.05)


async def test_a_connect_that_fails_counts_as_a_failure_not_as_a_connection_opened(
    backends, start_proxy
):
    """Requests to a port nothing listens on open no connection: each refused connect is
    counted in lb_upstream_connect_failures_total, and the live backend's connection in
    lb_upstream_connections_opened_total."""
    (live,) = await backends(1)
    dead_port = free_port()
    config = proxy_config(
        [
            {
                "name": "chat",
                "backends": [
                    {"url": f"http://127.0.0.1:{dead_port}", "name": "dead"},
                    {"url": live.url, "name": live.name},
                ],
                "retry": {"max_retries": 0},
            }
        ]
    )
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(4):
            async with s.get(url(app, "/")) as resp:
                statuses.append(resp.status)
        text = await scrape(s, app)
    refused = statuses.count(502)
    assert refused >= 1 and statuses.count(200) == 4 - refused
    failures = value(text, "lb_upstream_connect_failures_total", pool="chat", backend="dead")
    assert failures == refused
    assert value(text, "lb_upstream_connections_opened_total", pool="chat", backend="dead") == 0
    assert value(text, "lb_upstream_connections_opened_total", pool="chat", backend=live.name) == 1


async def test_error_answers_are_counted_at_every_stage_and_refused_keys_by_route(
    backends, start_proxy
):
    """Requests refused before any pool is chosen are counted too: a malformed request line
    and a head over the limit (never a request the handler saw), a path no route takes, and
    a missing key, which also counts under the route that asked for it."""
    (b0,) = await backends(1)
    routes = [
        {"path_prefix": "/secure/", "pool": "chat", "name": "keyed", "auth": {"api_keys": ["k1"]}}
    ]
    app = await start_proxy(
        proxy_config([pool("chat", [b0])], routes=routes, limits={"max_header_bytes": 4096})
    )
    assert (await raw_exchange(app.port, b"GET /a b c HTTP/1.1\r\n\r\n")).startswith(
        b"HTTP/1.1 400 "
    )
    huge = b"GET /secure/x HTTP/1.1\r\nhost: lb\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n"
    assert (await raw_exchange(app.port, huge)).startswith(b"HTTP/1.1 431 ")
    async with aiohttp.ClientSession() as s:
        for path, status in (("/nowhere", 404), ("/secure/x", 401), ("/secure/y", 401)):
            async with s.get(url(app, path)) as resp:
                assert resp.status == status
        text = await scrape(s, app)
    errors = {
        (dict(labels)["status"], dict(labels)["type"]): v
        for (name, labels), v in series(text).items()
        if name == "lb_error_responses_total"
    }
    assert errors == {
        ("400", "bad_request"): 1,
        ("431", "headers_too_large"): 1,
        ("404", "no_route"): 1,
        ("401", "unauthorized"): 2,
    }
    assert value(text, "lb_route_requests_total", route="keyed", code_class="4xx") == 2
    assert b0.hits == 0


async def test_a_scrape_counts_requests_by_route_name_and_status_class(backends, start_proxy):
    """Requests are counted under the route that took them: its name, else route-<index>."""
    (b0,) = await backends(1)
    routes = [{"name": "statuses", "path_prefix": "/status/", "pool": "chat"}, {"pool": "chat"}]
    config = proxy_config([pool("chat", [b0], retry={"max_retries": 0})], routes=routes)
    app = await start_proxy(config)
    async with aiohttp.ClientSession() as s:
        for path in ["/status/200"] * 3 + ["/status/503", "/other"]:
            async with s.get(url(app, path)) as resp:
                await resp.read()
        text = await scrape(s, app)
    assert value(text, "lb_route_requests_total", route="statuses", code_class="2xx") == 3
    assert value(text, "lb_route_requests_total", route="statuses", code_class="5xx") == 1
    assert value(text, "lb_route_requests_total", route="route-1", code_class="2xx") == 1


async def test_a_retried_503_counts_once_for_the_client_and_once_per_attempt_upstream(
    backends, start_proxy
):
    """With the default retry policy, a request every backend answers 503 is one 5xx answer,
    three upstream 5xx attempts (the first try and two retries) and two retries of reason 503."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))
    async with aiohttp.ClientSession() as s:
        async with s.get(url(app, "/status/503")) as resp:
            await resp.read()
            assert resp.status == 503
        text = await scrape(s, app)

    assert value(text, "lb_requests_total", pool="chat", code_class="5xx") == 1
    assert value(text, "lb_request_duration_seconds_count", pool="chat") == 1
    attempts = sum(
        value(text, "lb_upstream_responses_total", pool="chat", backend=b.name, code_class="5xx")
        for b in (b0, b1)
    )
    assert attempts == 3 == b0.hits + b1.hits
    assert b0.hits >= 1 and b1.hits >= 1  # the retry went to the backend not yet tried
    assert value(text, "lb_retries_total", pool="chat", reason="503") == 2


async def test_promtool_check_metrics_accepts_a_real_scrape(backends, start_proxy):
    """``promtool check metrics`` finds no problem in a scrape after varied traffic."""
    text = await busy_scrape(backends, start_proxy)
    assert "lb_retries_total{" in text and "lb_health_checks_total{" in text
    code, out = await run_promtool_async("check", "metrics", stdin=text)
    assert code == 0, out
    assert out.strip() == "", out


def test_the_alert_rules_pass_promtool_check_rules():
    """``promtool check rules deploy/alerts.yml`` accepts every rule."""
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_rules_pass_their_unit_tests():
    """``promtool test rules deploy/alerts_test.yml`` passes: each alert fires on its input
    series with the expected labels and annotations, and stays silent otherwise."""
    result = run_promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_unit_tests_cover_the_backend_down_and_error_ratio_alerts():
    """The promtool unit tests exercise at least the backend-down and error-ratio alerts, and
    every alert they name exists."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    defined = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert {"LbBackendDown", "LbHighErrorRatio"} <= tested
    assert tested <= defined


def test_every_alert_has_a_severity_summary_and_description():
    """Each alert carries a severity and a summary and description that name what fired."""
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert "{{ $labels." in annotations["summary"], rule["alert"]


def test_the_example_prometheus_config_passes_promtool_check_config():
    """``promtool check config deploy/prometheus.yml`` accepts it and finds the rule file."""
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert all(t.endswith(":9901") for c in job["static_configs"] for t in c["targets"])


async def test_every_metric_the_alerts_and_dashboard_query_exists_in_a_real_scrape(
    backends, start_proxy, deploy_metric_names
):
    """Each metric name in deploy/alerts.yml and deploy/grafana-dashboard.json is one the
    proxy exports, as its scrape's ``# TYPE`` lines declare it."""
    text = await busy_scrape(backends, start_proxy)
    exported = exported_names(text)
    for source, names in deploy_metric_names.items():
        missing = sorted(names - exported)
        assert not missing, f"{source} queries metrics the proxy does not export: {missing}"
    assert {
        "lb_backend_healthy", "lb_backend_available", "lb_requests_total", "lb_queue_depth",
        "lb_admission_rejected_total", "lb_ejections_total", "lb_pool_panic",
        "lb_config_reloads_total", "lb_retries_total",
    } <= deploy_metric_names["deploy/alerts.yml"]  # fmt: skip
    assert {
        "lb_requests_total", "lb_request_duration_seconds_bucket", "lb_upstream_in_flight",
        "lb_backend_available", "lb_backend_healthy", "lb_ejections_total", "lb_retries_total",
        "lb_queue_depth", "lb_queue_wait_seconds_bucket", "lb_health_checks_total",
        "lb_client_disconnects_total",
    } <= deploy_metric_names["deploy/grafana-dashboard.json"]  # fmt: skip


def test_the_dashboard_is_a_grafana_dashboard_with_datasource_and_pool_variables():
    """The dashboard is JSON of schema 36 or later, with a Prometheus datasource variable and
    a pool variable from ``label_values(lb_requests_total, pool)``; every panel queries that
    datasource and sits on the 24-column grid."""
    board = dashboard()
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pool"]["type"] == "query"
    assert "label_values(lb_requests_total, pool)" in variable_queries(board)
    panels = dashboard_panels(board)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
    assert any("histogram_quantile(0.99" in q for q in dashboard_queries(board))
    assert any("histogram_quantile(0.5" in q for q in dashboard_queries(board))


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each panel's expression, with Grafana's variables filled in, parses as PromQL: promtool
    checks them as recording rules."""
    queries = dashboard_queries(dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"lb_dashboard:query{i}", "expr": as_promql(q)}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout


async def _raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str, str]:
    """GET ``path`` over a fresh connection: the client's local port, and the status line and
    head of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        local_port = writer.get_extra_info("sockname")[1]
        lines = [f"GET {path} HTTP/1.1", "Host: lb.test", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return local_port, head.split("\r\n", 1)[0], head


async def test_no_label_value_is_a_request_id_a_path_or_a_client_address(backends, start_proxy):
    """Requests to unique paths, with unique request ids, from fresh client connections leave
    no trace of those in the scrape, and add no series."""
    b0, b1 = await backends(2)
    app = await start_proxy(proxy_config([pool("chat", [b0, b1])]))

    async def unique_round() -> tuple[set[str], set[int]]:
        secrets: set[str] = set()
        ports: set[int] = set()
        for path in ("/unique-{}", "/status/404?u={}", "/status/503?u={}"):
            token, request_id = uuid.uuid4().hex, str(uuid.uuid4())
            headers = {"x-request-id": request_id, "x-forwarded-for": "203.0.113.7"}
            port, status, _ = await _raw_get(app.port, path.format(token), headers)
            assert status.startswith("HTTP/1.1 "), status
            secrets |= {token, request_id}
            ports.add(port)
        # A request without an id gets one generated by the proxy; it must not leak either.
        port, _, head = await _raw_get(app.port, f"/unique-{uuid.uuid4().hex}", {})
        generated = [
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-request-id:")
        ]
        assert generated, head
        secrets |= set(generated)
        ports.add(port)
        return secrets, ports

    async with aiohttp.ClientSession() as s:
        first_secrets, first_ports = await unique_round()
        before = await scrape(s, app)
        second_secrets, second_ports = await unique_round()
        after = await scrape(s, app)

    assert set(series(before)) == set(series(after))
    assert value(after, "lb_requests_total", pool="chat", code_class="2xx") == 4
    for secret in first_secrets | second_secrets | {"unique-", "203.0.113.7"}:
        assert secret not in after, f"{secret!r} appears in the scrape"
    ports = {str(p) for p in first_ports | second_ports}
    for name, labels in series(after):
        for label, label_value in labels:
            assert "/" not in label_value, (name, label, label_value)
            assert not ADDRESS.search(label_value), (name, label, label_value)
            assert label_value not in ports, (name, label, label_value)


def counter_series(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a scrape that must never go down while the process runs: counters, and
    the buckets, counts and sums of histograms."""
    kinds = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
    out = {}
    for (name, labels), v in series(text).items():
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if kinds.get(name) == "counter" or kinds.get(base) == "histogram":
            out[(name, labels)] = v
    return out


async def scrapes_around_a_reload(backends: Any, tmp_path: Path) -> tuple[str, str]:
    """Scrapes of a proxy started from a file, before and after a successful reload of the
    same file, once it has counted answers, retries, health probes, queue waits and an
    admission rejection."""
    (b0,) = await backends(1)
    the_pool = pool(
        "chat",
        [b0],
        health_check={"interval_s": 0.05, "transition_interval_s": 0.05},
        admission={"max_concurrency": 1, "max_queue": 0},
    )
    path = tmp_path / "lb.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(proxy_config([the_pool])))
    app = App(await asyncio.to_thread(load_config, path), str(path))
    await app.start()
    try:
        async with aiohttp.ClientSession() as s:
            for target in ("/", "/status/503"):
                async with s.get(url(app, target)) as resp:
                    await resp.read()
            held = await s.get(url(app, "/stream?hold=1&chunks=1&interval_ms=1"))
            async with s.get(url(app, "/")) as resp:
                assert resp.status == 503  # the one slot is taken and the queue holds nothing
            b0.release.set()
            await held.read()
            held.release()
            for _ in range(200):
                if b0.probes >= 2:
                    break
                await asyncio.sleep(0.01)
            before = await scrape(s, app)
            assert await app.reload()
            after = await scrape(s, app)
    finally:
        await app.shutdown()
    assert value(after, "lb_config_reloads_total", result="success") == 1
    return before, after


def went_down(before: str, after: str) -> list[str]:
    """Counter and histogram samples present in both scrapes whose value decreased."""
    old, new = counter_series(before), counter_series(after)
    return [
        f"{name}{dict(labels)}: {old[(name, labels)]:g} -> {new[(name, labels)]:g}"
        for name, labels in sorted(old.keys() & new.keys(), key=str)
        if new[(name, labels)] < old[(name, labels)]
    ]


async def test_traffic_counters_keep_counting_across_a_reload(backends, tmp_path):
    """A successful reload leaves the request, upstream, retry, connection and ejection
    counters where they were."""
    before, after = await scrapes_around_a_reload(backends, tmp_path)
    kept = (
        "lb_requests_total", "lb_request_duration_seconds", "lb_upstream_responses_total",
        "lb_upstream_connections_opened_total", "lb_retries_total", "lb_ejections_total",
        "lb_client_disconnects_total",
    )  # fmt: skip
    assert value(before, "lb_retries_total", pool="chat", reason="503") == 2
    assert [line for line in went_down(before, after) if line.startswith(kept)] == []


async def test_no_counter_goes_down_across_a_reload(backends, tmp_path):
    """A successful reload never makes a counter or a histogram go down: Prometheus reads a
    decrease as a process restart."""
    before, after = await scrapes_around_a_reload(backends, tmp_path)
    assert went_down(before, after) == []
