"""HTTP/1.1 pieces: request-target normalization (what routes match and backends are asked
for) and chunk framing."""

from __future__ import annotations

import random

import pytest

from lb.http1 import (
    CHUNK_HEADS,
    chunk,
    chunk_head,
    needs_normalizing,
    normalize_target,
    scan_target,
)


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        (b"/v1/chat/completions", b"/v1/chat/completions"),
        (b"/v1/chat?x=1", b"/v1/chat?x=1"),
        (b"/%70rivate", b"/private"),
        (b"/%7Euser", b"/~user"),
        (b"/x/../private", b"/private"),
        (b"/a/./b/../c", b"/a/c"),
        (b"/%2e%2e/private", b"/private"),
        (b"/..", b"/"),
        (b"/a/..", b"/"),
        (b"/a/b/.", b"/a/b/"),
        (b"//private", b"/private"),
        (b"/a//b///c/", b"/a/b/c/"),
        (b"/a/b/", b"/a/b/"),
    ],
)
def test_a_path_is_normalized_as_envoy_normalize_path_and_merge_slashes_do(
    target: bytes, normalized: bytes
) -> None:
    assert normalize_target(target) == normalized


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2Fb",  # an encoded slash is data, not a separator
        b"/a%20b",  # a reserved or other character stays encoded
        b"/%zz",
        b"/%4",
        b"*",
        b"/v1?next=/../x//y%41",  # the query is never touched
    ],
)
def test_what_is_not_an_unreserved_escape_dot_segment_or_repeated_slash_is_kept(
    target: bytes,
) -> None:
    assert normalize_target(target) == target


def test_a_target_is_normalized_exactly_when_it_holds_a_percent_a_dot_segment_or_two_slashes() -> (
    None
):
    rng = random.Random(5)
    for _ in range(20_000):
        url = bytes(rng.choice(b"/.%a?") for _ in range(rng.randint(0, 8)))
        expected = url.find(b"%") >= 0 or url.find(b"/.") >= 0 or url.find(b"//") >= 0
        assert needs_normalizing(url) == expected, url
        assert scan_target(url) == expected, url  # the compiled build's form, in either build
        if not expected:
            assert normalize_target(url) == url, url


def test_a_chunk_is_its_hex_size_line_its_bytes_and_a_crlf_at_every_size() -> None:
    for size in [*range(len(CHUNK_HEADS) + 2), 65_536, 1_000_003]:
        data = b"x" * size
        assert chunk(data) == b"%x\r\n" % size + data + b"\r\n", size
        assert chunk_head(size) == b"%x\r\n" % size, size
