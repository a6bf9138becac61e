"""Request ids the proxy makes up, and the heads it forwards (hop-by-hop fields dropped)."""

from __future__ import annotations

from lb.forwarding import ForwardingSettings, new_request_id, request_head, response_head


def test_made_up_request_ids_share_a_random_prefix_and_never_repeat():
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    prefixes = {i.rsplit(b"-", 1)[0] for i in ids}
    assert len(prefixes) == 1
    (prefix,) = prefixes
    assert len(prefix) == 12 and all(c in b"0123456789abcdef" for c in prefix)
    counts = [int(i.rsplit(b"-", 1)[1]) for i in ids]
    assert counts == list(range(counts[0], counts[0] + 1000))


REQUEST_FIELDS = [
    (b"Host", b"example"),
    (b"Content-Type", b"application/json"),
    (b"Connection", b"keep-alive, X-Hop"),
    (b"X-Hop", b"dropped"),
    (b"Content-Length", b"2"),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"X-Request-Id", b"from-client"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Accept", b"text/event-stream"),
]


def forwarded_request(names: list[bytes] | None) -> bytes:
    return request_head(
        b"POST",
        b"/v1/chat/completions",
        REQUEST_FIELDS,
        names=names,
        host=b"example",
        default_host=b"backend:8000",
        client_ip=b"127.0.0.1",
        request_id=b"rid-1",
        content_length=2,
        chunked=False,
        settings=ForwardingSettings(),
    )


def test_the_request_head_is_the_same_with_the_parsed_lower_case_names_or_without():
    head = forwarded_request(None)
    assert head == forwarded_request([n.lower() for n, _ in REQUEST_FIELDS])
    assert b"X-Hop" not in head and b"Keep-Alive" not in head and b"from-client" not in head
    assert b"x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n" in head
    assert b"Accept: text/event-stream\r\n" in head


def test_names_out_of_step_with_the_fields_are_not_trusted():
    # One field fewer than the fields: the names are recomputed, not misapplied.
    names = [n.lower() for n, _ in REQUEST_FIELDS][1:]
    assert forwarded_request(names) == forwarded_request(None)


RESPONSE_FIELDS = [
    (b"Content-Type", b"text/event-stream"),
    (b"Connection", b"X-Hop"),
    (b"X-Hop", b"dropped"),
    (b"Transfer-Encoding", b"chunked"),
    (b"X-Request-Id", b"from-backend"),
    (b"Cache-Control", b"no-cache"),
]


def forwarded_response(names: list[bytes] | None) -> bytes:
    return response_head(
        200,
        RESPONSE_FIELDS,
        chunked=True,
        keep_alive=True,
        http10_keep_alive=False,
        extra=b"x-request-id: rid-1\r\n",
        settings=ForwardingSettings(),
        names=names,
    )


def test_the_response_head_is_the_same_with_the_parsed_lower_case_names_or_without():
    head = forwarded_response(None)
    assert head == forwarded_response([n.lower() for n, _ in RESPONSE_FIELDS])
    assert head.count(b"transfer-encoding: chunked") + head.count(b"Transfer-Encoding") == 1
    assert b"X-Hop" not in head and b"from-backend" not in head
    assert b"Cache-Control: no-cache\r\n" in head
    assert forwarded_response([b"content-type"]) == head  # out of step: recomputed
