"""Tests for lb.config: parsing, defaults, env interpolation and every kind of config error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lb.config import (
    Config,
    ConfigError,
    Limits,
    Listen,
    Timeouts,
    load_config,
    parse_config,
)

MINIMAL = """\
listen: {host: 127.0.0.1, port: 8080}
admin: {host: 127.0.0.1, port: 9901}   # /metrics, /healthz, /readyz; the admin API comes later
pools:
  - name: chat
    strategy: least_connections
    backends:
      - url: http://127.0.0.1:8001
      - url: http://127.0.0.1:8002
        weight: 2
routes:                                 # optional: without routes every request goes to the first pool
  - path_prefix: /v1/
    pool: chat
"""  # noqa: E501 (the documented example, verbatim)

ONE_POOL = """\
pools:
  - name: chat
    backends:
      - url: http://127.0.0.1:8001
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def test_minimal_config_parses_exactly_as_written(tmp_path: Path) -> None:
    """The documented minimal file loads with its listeners, pool, backends and route."""
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert (config.admin.host, config.admin.port, config.admin.enabled) == ("127.0.0.1", 9901, True)
    [pool] = config.pools
    assert (pool.name, pool.strategy, pool.strategy_options, pool.timeouts) == (
        "chat",
        "least_connections",
        {},
        None,
    )
    assert [(b.url, b.name, b.weight) for b in pool.backends] == [
        ("http://127.0.0.1:8001", "127.0.0.1:8001", 1),
        ("http://127.0.0.1:8002", "127.0.0.1:8002", 2),
    ]
    [route] = config.routes
    assert (route.path_prefix, route.pool, route.headers, route.methods) == (
        "/v1/",
        "chat",
        {},
        None,
    )


def test_unset_sections_take_their_documented_defaults(tmp_path: Path) -> None:
    """A file naming only a pool gets the default listeners, timeouts, limits and headers."""
    config = load_config(write(tmp_path, ONE_POOL))
    assert config.listen == Listen(host="127.0.0.1", port=8080)
    assert config.timeouts == Timeouts(connect_s=5.0, response_headers_s=600.0, idle_s=300.0)
    assert config.limits == Limits()
    assert config.limits.max_body_bytes == 33554432
    assert config.upstream.max_idle_per_backend == 128
    assert config.upstream.idle_timeout_s == 60.0  # nginx's upstream keepalive_timeout
    assert config.headers.backend_header == "x-lb-backend"
    assert config.headers.request_id_header == "x-request-id"
    assert config.shutdown.grace_s == 30.0
    assert config.log_level == "info"
    assert config.routes == []
    assert config.pools[0].strategy == "round_robin"


def test_backend_name_defaults_to_host_and_port_by_scheme() -> None:
    """Without a name a backend is called host:port, the port defaulting to 80 or 443."""
    config = parse_config(
        {
            "pools": [
                {
                    "name": "p",
                    "backends": [
                        {"url": "http://Model-A"},
                        {"url": "https://model-b/"},
                        {"url": "http://[::1]:8001"},
                        {"url": "http://model-c:9000", "name": "c"},
                    ],
                }
            ]
        }
    )
    names = [b.name for b in config.pools[0].backends]
    assert names == ["model-a:80", "model-b:443", "[::1]:8001", "c"]


def test_pool_timeouts_override_only_the_keys_the_pool_sets() -> None:
    """A pool's timeouts replace the global values they name and inherit the rest."""
    config = parse_config(
        {
            "timeouts": {"connect_s": 2.0, "idle_s": None},
            "pools": [
                {"name": "a", "backends": [{"url": "http://a"}]},
                {"name": "b", "backends": [{"url": "http://b"}], "timeouts": {"connect_s": 1}},
            ],
        }
    )
    assert config.pool_timeouts(config.pools[0]) == config.timeouts
    assert config.pool_timeouts(config.pools[1]) == Timeouts(
        connect_s=1.0, response_headers_s=600.0, idle_s=None
    )


def test_route_header_names_are_lowered_and_methods_upper_cased() -> None:
    """Route header names compare case-insensitively and methods are normalised to upper case."""
    config = parse_config(
        {
            "pools": [{"name": "p", "backends": [{"url": "http://a"}]}],
            "routes": [{"pool": "p", "headers": {"X-Model": "Llama"}, "methods": ["post"]}],
        }
    )
    assert config.routes[0].headers == {"x-model": "Llama"}
    assert config.routes[0].methods == ["POST"]


def test_env_var_is_substituted_in_string_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${VAR}`` is replaced by the variable's value, inside a longer string too."""
    monkeypatch.setenv("LB_TEST_HOST", "10.0.0.7")
    path = write(tmp_path, ONE_POOL.replace("127.0.0.1", "${LB_TEST_HOST}"))
    assert load_config(path).pools[0].backends[0].url == "http://10.0.0.7:8001"


def test_env_default_is_used_when_var_is_unset_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${VAR:-default}`` falls back to the default for an unset or empty variable."""
    monkeypatch.delenv("LB_TEST_UNSET", raising=False)
    monkeypatch.setenv("LB_TEST_EMPTY", "")
    text = (
        ONE_POOL + "listen: {host: '${LB_TEST_EMPTY:-0.0.0.0}', port: '${LB_TEST_UNSET:-8088}'}\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.listen == Listen(host="0.0.0.0", port=8088)


def test_env_value_is_coerced_to_the_field_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A substituted string becomes an int where the field is an int."""
    monkeypatch.setenv("LB_TEST_PORT", "9000")
    config = load_config(write(tmp_path, ONE_POOL + "listen: {port: '${LB_TEST_PORT:-8080}'}\n"))
    assert config.listen.port == 9000


def test_an_unquoted_reference_inside_a_flow_mapping_is_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``{port: ${PORT}}`` is not YAML's nested braces: it reads as the variable's value."""
    monkeypatch.setenv("LB_TEST_PORT", "9000")
    monkeypatch.setenv("LB_TEST_HOST", "10.0.0.7")
    text = ONE_POOL + "listen: {host: ${LB_TEST_HOST}, port: ${LB_TEST_PORT}}\n"
    config = load_config(write(tmp_path, text))
    assert (config.listen.host, config.listen.port) == ("10.0.0.7", 9000)


def test_a_file_that_is_no_yaml_with_or_without_references_names_its_first_error(
    tmp_path: Path,
) -> None:
    error = load_error(tmp_path, ONE_POOL + "listen: {port: ${LB_TEST_PORT}, : [\n")
    assert error.reason.startswith("invalid YAML at line")


def test_double_dollar_escapes_a_literal_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$${`` yields a literal ``${`` and is not expanded."""
    monkeypatch.setenv("X", "expanded")
    config = parse_config(
        {
            "pools": [
                {
                    "name": "p",
                    "strategy_options": {"template": "$${X} and ${X}"},
                    "backends": [{"url": "http://a"}],
                }
            ]
        }
    )
    assert config.pools[0].strategy_options == {"template": "${X} and expanded"}


def test_undefined_env_var_is_reported_at_its_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``${VAR}`` with no such variable and no default names the variable and the key."""
    monkeypatch.delenv("LB_TEST_MISSING", raising=False)
    error = load_error(tmp_path, ONE_POOL.replace("127.0.0.1", "${LB_TEST_MISSING}"))
    assert error.key == "pools[0].backends[0].url"
    assert "LB_TEST_MISSING is not set" in error.reason
    assert "config.yaml: pools[0].backends[0].url: environment variable" in str(error)


def test_bad_yaml_is_reported_with_line_and_column(tmp_path: Path) -> None:
    """A syntax error names the file, the line and the column."""
    error = load_error(tmp_path, "pools:\n  - name: [chat\n")
    assert error.key == ""
    assert "invalid YAML at line 3, column 1" in error.reason
    assert str(error).startswith(f"{tmp_path / 'config.yaml'}: invalid YAML")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    """A key given twice in one mapping is refused rather than silently overwritten."""
    error = load_error(tmp_path, ONE_POOL + "pools: []\n")
    assert "duplicate key 'pools'" in error.reason
    assert "line 5" in error.reason


def test_yaml_merge_keys_share_settings_and_a_key_written_out_wins(tmp_path: Path) -> None:
    """``<<: *anchor`` merges a mapping in (YAML 1.1), from an ``x-`` top-level key that is
    otherwise not read; a key the mapping writes itself overrides the merged one."""
    config = load_config(
        write(
            tmp_path,
            """\
            x-replica: &replica {weight: 3, max_concurrency: 8}
            pools:
              - name: chat
                backends:
                  - <<: *replica
                    url: http://127.0.0.1:8001
                  - <<: *replica
                    url: http://127.0.0.1:8002
                    weight: 1
            """,
        )
    )
    backends = config.pools[0].backends
    assert [(b.weight, b.max_concurrency) for b in backends] == [(3, 8), (1, 8)]


def test_a_key_given_twice_beside_a_merge_key_is_still_an_error(tmp_path: Path) -> None:
    """Merging does not excuse a key the mapping itself writes twice."""
    error = load_error(
        tmp_path,
        """\
        x-replica: &replica {weight: 3}
        pools:
          - name: chat
            backends:
              - <<: *replica
                url: http://127.0.0.1:8001
                url: http://127.0.0.1:8002
        """,
    )
    assert "duplicate key 'url'" in error.reason


def test_a_merge_of_a_mapping_that_merges_another_is_no_duplicate(tmp_path: Path) -> None:
    """``mid`` merges ``base`` and overrides its strategy; a pool merges ``mid``. However the
    anchors nest, the override is no duplicate key, and the nearest value wins."""
    config = load_config(
        write(
            tmp_path,
            """\
            x-d: {i: {b: &b {strategy: round_robin}, m: &m {<<: *b, strategy: least_connections}}}
            pools:
              - {<<: *m, name: chat, backends: [{url: "http://127.0.0.1:8001"}]}
            """,
        )
    )
    assert config.pools[0].strategy == "least_connections"


def test_the_schema_allows_extension_keys_at_the_top_level() -> None:
    """Editors checking the file against ``lb schema`` accept ``x-`` keys, as lb does."""
    schema = Config.model_json_schema()
    assert schema["additionalProperties"] is False
    assert list(schema["patternProperties"]) == ["^x-"]


def test_unknown_top_level_key_is_reported_with_the_allowed_keys(tmp_path: Path) -> None:
    """A misspelt top-level key is an error that lists what is allowed."""
    error = load_error(tmp_path, ONE_POOL + "listn: {port: 1}\n")
    assert error.key == "listn"
    assert error.reason.startswith("unknown key 'listn' (allowed: listen, admin, pools")


def test_unknown_nested_key_is_reported_at_its_path(tmp_path: Path) -> None:
    """A misspelt key inside a backend is reported with its full key path."""
    error = load_error(tmp_path, ONE_POOL + "        wieght: 2\n")
    assert error.key == "pools[0].backends[0].wieght"
    assert "unknown key 'wieght' (allowed: url, weight, max_concurrency, name)" in str(error)


def test_a_value_no_branch_of_a_choice_takes_is_one_problem_naming_every_choice(
    tmp_path: Path,
) -> None:
    """``retry_on`` takes a condition's name or a status: a value that is neither is one
    line saying both, at the entry's own key, not a line per alternative tried."""
    text = ONE_POOL + "    retry: {retry_on: [timeout, bogus]}\n"
    error = load_error(tmp_path, text)
    assert str(error).count("\n") == 0
    assert error.key == "pools[0].retry.retry_on[1]"
    assert error.reason == (
        "expected 'connect_error', 'reset' or 'timeout' or a valid integer (got 'bogus')"
    )


def test_wrong_type_is_reported_with_the_value_given(tmp_path: Path) -> None:
    """A value of the wrong type names the expected type and the value found."""
    error = load_error(tmp_path, ONE_POOL + "        weight: heavy\n")
    assert error.key == "pools[0].backends[0].weight"
    assert "valid integer" in error.reason
    assert "'heavy'" in error.reason


def test_duplicate_pool_name_is_an_error(tmp_path: Path) -> None:
    """Two pools with one name are refused at the second one's name."""
    error = load_error(tmp_path, ONE_POOL + "  - name: chat\n    backends: [{url: 'http://b'}]\n")
    assert str(error).endswith("config.yaml: pools[1].name: duplicate pool name 'chat'")


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("999.1.1.1", "not an IPv4 address"),
        ("127.0.0.1 ", "must not contain spaces"),
        ("[::1]", "without brackets"),
    ],
)
def test_a_listener_host_no_socket_can_bind_is_an_error(
    tmp_path: Path, host: str, reason: str
) -> None:
    error = load_error(tmp_path, ONE_POOL + f"listen: {{host: '{host}'}}\n")
    assert error.key == "listen.host"
    assert reason in error.reason


def test_localhost_and_127_0_0_1_on_one_port_clash(tmp_path: Path) -> None:
    text = ONE_POOL + "listen: {host: localhost, port: 9000}\nadmin: {port: 9000}\n"
    assert load_error(tmp_path, text).key == "admin.port"


def test_duplicate_route_name_is_an_error(tmp_path: Path) -> None:
    """A route named like an unnamed route's default name is refused at the second one."""
    routes = "routes:\n  - {path_prefix: /v1, pool: chat}\n  - {name: route-0, pool: chat}\n"
    error = load_error(tmp_path, ONE_POOL + routes)
    assert error.key == "routes[1].name"
    assert error.reason.startswith("duplicate route name 'route-0'")


def test_duplicate_backend_url_is_an_error(tmp_path: Path) -> None:
    """The same backend twice in a pool, even spelt differently, is refused."""
    error = load_error(tmp_path, ONE_POOL + "      - url: HTTP://127.0.0.1:8001/\n")
    assert error.key == "pools[0].backends[1].url"
    assert error.reason.startswith("duplicate backend 'HTTP://127.0.0.1:8001/'")


def test_duplicate_backend_name_is_an_error(tmp_path: Path) -> None:
    """Two backends of a pool sharing a name are refused at the second name."""
    text = ONE_POOL + "        name: a\n      - url: http://127.0.0.1:8002\n        name: a\n"
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].backends[1].name"
    assert error.reason.startswith("duplicate backend name 'a'")


def test_route_to_a_missing_pool_lists_the_pools(tmp_path: Path) -> None:
    """A route naming no existing pool says which pools there are."""
    error = load_error(tmp_path, ONE_POOL + "routes: [{pool: embed}]\n")
    assert error.key == "routes[0].pool"
    assert error.reason == "no pool named 'embed' (pools: chat)"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("127.0.0.1:8001", "URL must start with http:// or https://"),
        ("ftp://127.0.0.1:8001", "URL must start with http:// or https://"),
        ("http://127.0.0.1:8001/v1", "URL must not have a path"),
        ("http://127.0.0.1:8001?a=1", "URL must not have a query string"),
        ("http://:8001", "URL has no host"),
        ("http://127.0.0.1:70000", "URL port must be an integer 1..65535"),
        ("http://127.0.0.1:0", "URL port must be an integer 1..65535"),
        ("http://127.0.0.1:\u0668\u0660", "URL port must be an integer 1..65535"),
        ("http://127.0.0.1:\u00b9", "URL port must be an integer 1..65535"),
        ("http://a b:8001", "URL host must not contain spaces or control characters"),
    ],
)
def test_bad_backend_url_is_reported_with_a_reason(tmp_path: Path, url: str, reason: str) -> None:
    """Each malformed backend URL is refused at its key path with a specific reason."""
    error = load_error(tmp_path, ONE_POOL.replace("http://127.0.0.1:8001", url))
    assert error.key == "pools[0].backends[0].url"
    assert error.reason.startswith(reason)


def test_listen_port_out_of_range_is_an_error(tmp_path: Path) -> None:
    """A listen port above 65535 is refused at listen.port."""
    error = load_error(tmp_path, ONE_POOL + "listen: {port: 65536}\n")
    assert error.key == "listen.port"
    assert "less than or equal to 65535" in error.reason


def test_admin_on_the_listen_address_is_an_error(tmp_path: Path) -> None:
    """The admin listener may not share the proxy's host and port."""
    error = load_error(tmp_path, ONE_POOL + "admin: {port: 8080}\n")
    assert error.key == "admin.port"
    assert "clashes with listen 127.0.0.1:8080" in error.reason


def test_every_validation_error_is_reported_first_one_first(tmp_path: Path) -> None:
    """Several problems give one line each, in file order."""
    error = load_error(tmp_path, "listen: {port: 0}\npools: []\nbogus: 1\n")
    lines = str(error).splitlines()
    assert [key for key, _ in error.problems] == ["listen.port", "pools", "bogus"]
    assert len(lines) == 3
    assert lines[0].endswith(
        "config.yaml: listen.port: Input should be greater than or equal to 1 (got 0)"
    )
    assert error.key == "listen.port"


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A file that does not exist is reported without a key."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.key == ""
    assert (
        str(info.value)
        == f"{tmp_path / 'absent.yaml'}: cannot read file: No such file or directory"
    )


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    """A file with no content (or only comments) is refused."""
    error = load_error(tmp_path, "# nothing yet\n")
    assert (error.key, error.reason) == ("", "file is empty")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    """A file whose top level is a list is refused."""
    error = load_error(tmp_path, "- pools\n")
    assert error.reason == "top level must be a mapping (got a list)"


def test_parse_config_labels_errors_with_the_source() -> None:
    """Errors from an already-parsed tree carry the given source label."""
    with pytest.raises(ConfigError) as info:
        parse_config({"pools": "chat"}, source="reload")
    assert str(info.value).startswith("reload: pools: Input should be a valid list")


def test_schema_describes_every_field() -> None:
    """Every property in the JSON schema has a description, for ``lb schema``."""
    schema = Config.model_json_schema()
    models = [schema, *schema["$defs"].values()]
    missing = [
        f"{model['title']}.{name}"
        for model in models
        for name, prop in model["properties"].items()
        if "description" not in prop
    ]
    assert missing == []


def test_a_long_base_ejection_alone_still_loads(tmp_path: Path) -> None:
    """Only a maximum written below a written base contradicts itself: a base above the
    default maximum alone loads, capped by that default, as it always did."""
    config = load_config(
        write(tmp_path, ONE_POOL + "    outlier_detection: {base_ejection_s: 600}\n")
    )
    assert config.pools[0].outlier_detection.base_ejection_s == 600


@pytest.mark.parametrize(
    ("setting", "key", "reason"),
    [
        (
            "outlier_detection: {failure_statuses: [500, 200]}",
            "pools[0].outlier_detection.failure_statuses",
            "200 is no error status",
        ),
        (
            "retry: {retry_on: [reset, 200]}",
            "pools[0].retry.retry_on",
            "200 is no error status",
        ),
        (
            "outlier_detection: {base_ejection_s: 100, max_ejection_s: 5}",
            "pools[0].outlier_detection",
            "max_ejection_s (5) is shorter than base_ejection_s (100)",
        ),
    ],
)
def test_settings_that_contradict_themselves_are_refused(
    tmp_path: Path, setting: str, key: str, reason: str
) -> None:
    """A 200 counted as a failure or retried, or ejections capped below their first length,
    can only be mistakes: refused with the key and why, where they used to load silently."""
    error = load_error(tmp_path, ONE_POOL + f"    {setting}\n")
    assert error.key == key
    assert reason in error.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("limits: {header_timeout_s: .inf}\n", "limits.header_timeout_s"),
        ("limits: {keepalive_timeout_s: 1e309}\n", "limits.keepalive_timeout_s"),
        ("timeouts: {idle_s: .inf}\n", "timeouts.idle_s"),
        ("timeouts: {connect_s: .nan}\n", "timeouts.connect_s"),
    ],
)
def test_an_infinite_or_nan_duration_is_refused(tmp_path: Path, text: str, key: str) -> None:
    """Accepted, an infinite timeout broke every connection's timer at run time."""
    error = load_error(tmp_path, ONE_POOL + text)
    assert error.key == key
    assert "finite number" in error.reason


def test_an_infinite_ejection_is_refused_at_its_pool(tmp_path: Path) -> None:
    text = ONE_POOL + "    outlier_detection: {base_ejection_s: .inf}\n"
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].outlier_detection.base_ejection_s"


def test_more_workers_than_any_machine_has_cores_is_refused(tmp_path: Path) -> None:
    """A typo like 100000 would start every one of them."""
    error = load_error(tmp_path, ONE_POOL + "workers: 100000\n")
    assert error.key == "workers"
    assert "1024" in error.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("headers: {backend_header: 'x-a\\r\\nx-evil: 1'}\n", "headers.backend_header"),
        ("headers: {request_id_header: 'x request id'}\n", "headers.request_id_header"),
        ("headers: {decision_header: 'x:y'}\n", "headers.decision_header"),
    ],
)
def test_a_header_name_that_is_no_http_token_is_refused(
    tmp_path: Path, text: str, key: str
) -> None:
    """Written into every response (or looked for in every request), such a name would inject
    fields or break the requests forwarded."""
    error = load_error(tmp_path, ONE_POOL + text)
    assert error.key == key
    assert "HTTP token" in error.reason


def test_a_route_header_or_method_that_is_no_token_is_refused(tmp_path: Path) -> None:
    route = "routes:\n  - {pool: chat, headers: {'bad name:': x}}\n"
    assert "HTTP token" in load_error(tmp_path, ONE_POOL + route).reason
    route = "routes:\n  - {pool: chat, methods: ['G ET']}\n"
    error = load_error(tmp_path, ONE_POOL + route)
    assert error.key.startswith("routes[0].methods")
    assert "HTTP token" in error.reason


def test_a_backend_name_with_a_line_break_is_refused(tmp_path: Path) -> None:
    """The name is written in the backend header: a line break would inject a field."""
    text = ONE_POOL.replace(
        "      - url: http://127.0.0.1:8001\n",
        '      - url: http://127.0.0.1:8001\n        name: "a\\r\\nx-evil: injected"\n',
    )
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].backends[0].name"
    assert "control characters" in error.reason


@pytest.mark.parametrize("status", [999, -1, 99])
def test_a_failure_status_that_is_no_http_status_is_refused(tmp_path: Path, status: int) -> None:
    """As retry_on's statuses are: such a status could never count, and was a typo."""
    text = ONE_POOL + f"    outlier_detection: {{failure_statuses: [500, {status}]}}\n"
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].outlier_detection.failure_statuses"
    assert f"{status} is not an HTTP status" in error.reason


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("listen: {port: true}\n", "listen.port"),
        ("timeouts: {connect_s: false}\n", "timeouts.connect_s"),
        ("limits: {max_connections: true}\n", "limits.max_connections"),
    ],
)
def test_true_or_false_for_a_number_is_refused(tmp_path: Path, text: str, key: str) -> None:
    """pydantic would take them for 1 and 0: `port: true` listened on port 1."""
    error = load_error(tmp_path, ONE_POOL + text)
    assert error.key == key
    assert "expected a number, got" in error.reason


def test_a_backend_weight_of_true_is_refused(tmp_path: Path) -> None:
    text = ONE_POOL.replace(
        "- url: http://127.0.0.1:8001\n", "- {url: 'http://127.0.0.1:8001', weight: true}\n"
    )
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].backends[0].weight"


def test_a_boolean_setting_still_takes_true_and_false(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ONE_POOL + "headers: {forwarded: false}\n"))
    assert config.headers.forwarded is False


def test_a_backend_url_with_a_dotted_number_that_is_no_ipv4_address_is_refused(
    tmp_path: Path,
) -> None:
    error = load_error(tmp_path, ONE_POOL.replace("127.0.0.1:8001", "999.1.1.1:8001"))
    assert error.key == "pools[0].backends[0].url"
    assert "not an IPv4 address" in error.reason


def test_a_least_loaded_shadow_strategy_needs_load_reports(tmp_path: Path) -> None:
    """As the strategy itself does: without reports it would rank every backend alike."""
    error = load_error(tmp_path, ONE_POOL + "    shadow_strategy: least_loaded\n")
    assert error.key == "pools[0].load_report.enabled"
    assert "shadow_strategy" in error.reason


def test_a_strategy_freshness_window_shorter_than_the_scrape_interval_is_an_error(
    tmp_path: Path,
) -> None:
    """As for load_report.max_age_s: reports would be stale between every two scrapes."""
    text = ONE_POOL + (
        "    strategy: cache_aware\n"
        "    strategy_options: {max_age_s: 0.1}\n"
        "    load_report: {enabled: true, interval_s: 0.25}\n"
    )
    error = load_error(tmp_path, text)
    assert error.key == "pools[0].strategy_options.max_age_s"
    assert "not longer than load_report.interval_s (0.25)" in error.reason
