"""Inference metrics taken from responses as they pass: time to first token, time between
tokens, prompt and completion tokens, requests by model.

For a streamed response (``text/event-stream``) every event that carries text (a non-empty
``content`` or ``text``; not the role-only first chunk, nor the finish and usage chunks) is one
token's chunk: the first one's arrival is the time to first token, the gaps between them the
time between tokens (several read at once share the gap evenly). Token counts come from the
``usage`` object at the end of the body when the server sends one (OpenAI's
``stream_options.include_usage``, vLLM, SGLang, and every non-streamed JSON answer); a stream
without ``usage`` counts its text chunks as completion tokens, reported apart as an estimate.
Nothing here parses a whole body.
"""

from __future__ import annotations

import re
import time
from typing import Final

from lb.histogram import Histogram
from lb.http1 import COMPILED

# Time between tokens: from well under a millisecond to seconds.
TBT_BUCKETS_S: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
TTFT_BUCKETS_S: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip

_PROMPT: Final = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION: Final = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
MODEL_MAX_BYTES: Final = 200  # a longer "model" value is not taken for a model name
_MODEL: Final = re.compile(rb'"model"\s*:\s*"([^"\\]{1,%d})"' % MODEL_MAX_BYTES)
# A streamed chunk carrying text: OpenAI chat deltas ("content") and completions ("text"),
# found by str.find over the chunk's Latin-1 view (a regex search stops at every quote of the
# chunk). Servers write compact JSON ("content":"...), checked in place; any other spelling
# goes to a regex.
_TEXT_KEYS: Final = ('"content"', '"text"')
_NON_EMPTY_STRING: Final = re.compile(rb'\s*:\s*"(?!")')
_QUOTE: Final = 34  # ord('"')
_COLON: Final = 58  # ord(":")
_BACKSLASH: Final = 92  # ord("\\")
CARRY_BYTES: Final = 32
TAIL_BYTES: Final = 2048  # the end of a JSON body kept to find its usage
_TAIL_MAX: Final = 2 * TAIL_BYTES  # kept until then, and cut back to TAIL_BYTES
MAX_MODELS: Final = 64  # distinct model labels kept; more are counted as "other"


def model_in(body_start: bytes) -> str | None:
    """The ``model`` named near the start of a JSON request body, without parsing it all:
    the first ``"model"`` key followed by a string of 1 to 200 bytes with no escapes in it,
    as ``_MODEL`` finds it.

    Interpreted, the regex's search in C is quickest; compiled, :func:`scan_model` is (there a
    regex costs more to set up per call than that whole scan).
    """
    if COMPILED:
        return scan_model(body_start)
    match = _MODEL.search(body_start)
    return match.group(1).decode("utf-8", "replace") if match else None


def scan_model(body_start: bytes) -> str | None:
    """:func:`model_in` by hand: one bytes.find per ``"model"``, then indexing."""
    size = len(body_start)
    at = body_start.find(b'"model"')
    while at >= 0:
        i = _after_space(body_start, at + 7, size)
        if i < size and body_start[i] == _COLON:
            i = _after_space(body_start, i + 1, size)
            if i < size and body_start[i] == _QUOTE:
                start = i + 1
                end = _string_end(body_start, start, min(size, start + MODEL_MAX_BYTES + 1))
                if end > start:
                    return body_start[start:end].decode("utf-8", "replace")
        # The next "model" may begin at this one's closing quote (6 bytes on).
        at = body_start.find(b'"model"', at + 6)
    return None


def _string_end(buf: bytes, start: int, stop: int) -> int:
    """The index of the quote closing a string that starts at ``start``, if it comes before
    ``stop`` with no backslash before it; else -1."""
    for i in range(start, stop):
        c = buf[i]
        if c == _QUOTE:
            return i
        if c == _BACKSLASH:
            return -1
    return -1


def _after_space(buf: bytes, i: int, size: int) -> int:
    """The index of the first byte at or after ``i`` that is not whitespace (regex ``\\s``)."""
    while i < size:
        c = buf[i]
        if c != 32 and not 9 <= c <= 13:
            return i
        i += 1
    return size


def text_events(buf: bytes, skip: int, keys: tuple[str, ...] = _TEXT_KEYS) -> int:
    """How many text-carrying keys (``"content": "..."``, ``"text": "..."``, not empty) are
    decided in ``buf`` and were not in its first ``skip`` bytes.

    A key is decided once the byte after its opening quote has arrived (an empty string is no
    text): one whose quote ends ``buf`` waits for the next read, which carries it again.
    The search runs over ``buf`` decoded as Latin-1, one character per byte (the same
    indices): ``str.find`` is a direct C call in the compiled build, where ``bytes.find``
    parses its arguments anew on every call.
    """
    text = buf.decode("latin-1")
    count = 0
    size = len(text)
    for key in keys:
        at = text.find(key)
        while at >= 0:
            end = at + len(key)
            if text[end : end + 2] == ':"':
                opened = end + 2  # just past the opening quote
                if skip <= opened < size and text[opened] != '"':
                    count += 1
            else:
                found = _NON_EMPTY_STRING.match(buf, end)
                if found is not None and skip <= found.end() < size:
                    count += 1
            at = text.find(key, end)
    return count


class InferenceStats:
    """Per-pool inference figures, read by the metrics collector."""

    __slots__ = (
        "completion_tokens",
        "completion_tokens_estimated",
        "prompt_tokens",
        "requests_by_model",
        "streams",
        "tbt",
        "ttft",
    )

    def __init__(self) -> None:
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.tbt = Histogram(TBT_BUCKETS_S)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.completion_tokens_estimated = 0  # chunks counted, for streams without usage
        self.streams = 0
        self.requests_by_model: dict[str, int] = {}

    def count_model(self, model: str | None, *, served: bool = True) -> None:
        """Count one request under its model's label. A name gets a label of its own only
        once a request for it was ``served`` (a 2xx): names no server knows (404s) cannot
        take the bounded label set from real models; until then they count as ``other``."""
        label = model if model is not None else "unknown"
        counts = self.requests_by_model
        if label in counts:  # the common case: a model seen before
            counts[label] += 1
            return
        if not served and model is not None:
            counts["other"] = counts.get("other", 0) + 1
            return
        # A JSON body may name a model with a lone surrogate ("\ud800"), which no UTF-8 text
        # can hold: as a label it would make every later /metrics scrape fail.
        encoded = label.encode("utf-8", "replace")
        label = encoded.decode()
        if len(encoded) > MODEL_MAX_BYTES:
            # No model is named so: a label as long as a body would bloat every scrape.
            label = "other"
        elif label not in counts and len(counts) >= MAX_MODELS:
            label = "other"
        counts[label] = counts.get(label, 0) + 1


class ResponseMeter:
    """Watches one response's body for tokens and usage."""

    __slots__ = ("_carry", "_keys", "_last_s", "_stats", "_tail", "events", "sse", "started_s")

    def __init__(self, stats: InferenceStats, started_s: float, sse: bool) -> None:
        self._stats = stats
        self.started_s = started_s
        self.sse = sse
        self.events = 0  # token chunks seen so far (SSE events with text)
        self._last_s = 0.0
        self._tail = bytearray()  # the end of the body: at least its last TAIL_BYTES
        self._carry = b""
        # Narrowed to the key the first text chunk used: chat streams "content", others "text".
        self._keys: tuple[str, ...] = _TEXT_KEYS
        if sse:
            stats.streams += 1

    def on_body(self, data: bytes) -> None:
        tail = self._tail
        tail += data
        if len(tail) > _TAIL_MAX:
            del tail[:-TAIL_BYTES]
        if not self.sse:
            return
        # Token chunks are the events with non-empty content: not the role-only first chunk,
        # nor the finish or usage chunks. A match may straddle two reads: the carried end of
        # the previous read is searched again, and only matches not decided in it count.
        buf = self._carry + data
        skip = len(self._carry)
        events = text_events(buf, skip, self._keys)
        self._carry = buf[-CARRY_BYTES:]
        if events <= 0:
            return
        if len(self._keys) > 1:
            chat = text_events(buf, skip, _TEXT_KEYS[:1]) > 0
            self._keys = _TEXT_KEYS[:1] if chat else _TEXT_KEYS[1:]
        now = time.monotonic()
        stats = self._stats
        if self.events == 0:
            stats.ttft.observe(now - self.started_s)
            events -= 1
            self.events = 1
            self._last_s = now
            if events == 0:
                return
        stats.tbt.observe_many((now - self._last_s) / events, events)
        self.events += events
        self._last_s = now

    def on_end(self) -> None:
        tail = bytes(self._tail[-TAIL_BYTES:])
        at = tail.rfind(b'"usage"')
        stats = self._stats
        if at < 0:
            prompt = completion = None
        else:
            usage = tail[at:]
            prompt = _PROMPT.search(usage)
            completion = _COMPLETION.search(usage)
        if prompt is not None:
            stats.prompt_tokens += int(prompt.group(1))
        if completion is not None:
            stats.completion_tokens += int(completion.group(1))
        elif self.sse and self.events:
            stats.completion_tokens_estimated += self.events  # no usage: chunks stand in
