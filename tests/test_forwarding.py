"""Request ids the proxy makes up for requests that arrive without one."""

from __future__ import annotations

from lb.forwarding import new_request_id


def test_made_up_request_ids_share_a_random_prefix_and_never_repeat():
    ids = [new_request_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    prefixes = {i.rsplit(b"-", 1)[0] for i in ids}
    assert len(prefixes) == 1
    (prefix,) = prefixes
    assert len(prefix) == 12 and all(c in b"0123456789abcdef" for c in prefix)
    counts = [int(i.rsplit(b"-", 1)[1]) for i in ids]
    assert counts == list(range(counts[0], counts[0] + 1000))
