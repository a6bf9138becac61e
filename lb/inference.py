"""Inference metrics taken from responses as they pass: time to first token, time between
tokens, prompt and completion tokens, requests by model.

For a streamed response (``text/event-stream``) every ``data:`` event but the final
``[DONE]`` is taken as one token's chunk: the first one's arrival is the time to first token,
the gaps between them the time between tokens (several events read at once share the gap
evenly). Token counts come from the ``usage`` object when the server sends one (OpenAI's
``stream_options.include_usage``, vLLM, SGLang); a stream without ``usage`` counts its chunks as
completion tokens, reported apart as an estimate. For a JSON response the ``usage`` object is
read from the end of the body. Nothing here parses a whole body.
"""

from __future__ import annotations

import re
import time

from lb.histogram import Histogram

# Time between tokens: from well under a millisecond to seconds.
TBT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
TAIL_BYTES = 2048  # the end of a JSON body kept to find its usage
MAX_MODELS = 64  # distinct model labels kept; more are counted as "other"


def model_in(body_start: bytes) -> str | None:
    """The ``model`` named near the start of a JSON request body, without parsing it all."""
    match = _MODEL.search(body_start)
    return match.group(1).decode("utf-8", "replace") if match else None


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

    def count_model(self, model: str | None) -> None:
        label = model if model is not None else "unknown"
        counts = self.requests_by_model
        if label not in counts and len(counts) >= MAX_MODELS:
            label = "other"
        counts[label] = counts.get(label, 0) + 1


class ResponseMeter:
    """Watches one response's body for tokens and usage."""

    __slots__ = ("_events", "_last_s", "_stats", "_tail", "_usage_seen", "sse", "started_s")

    def __init__(self, stats: InferenceStats, started_s: float, sse: bool) -> None:
        self._stats = stats
        self.started_s = started_s
        self.sse = sse
        self._events = 0
        self._last_s = 0.0
        self._usage_seen = False
        self._tail = b""
        if sse:
            stats.streams += 1

    def on_body(self, data: bytes) -> None:
        if not self.sse:
            self._tail = (self._tail + data)[-TAIL_BYTES:]
            return
        events = data.count(b"data:")
        if b"[DONE]" in data:
            events -= 1
        if b'"usage"' in data:
            self._read_usage(data)
        if events <= 0:
            return
        now = time.monotonic()
        stats = self._stats
        if self._events == 0:
            stats.ttft.observe(now - self.started_s)
            events -= 1
            self._events = 1
            self._last_s = now
            if events == 0:
                return
        gap = (now - self._last_s) / events
        for _ in range(min(events, 64)):
            stats.tbt.observe(gap)
        self._events += events
        self._last_s = now

    def _read_usage(self, data: bytes) -> None:
        prompt = _PROMPT.search(data)
        completion = _COMPLETION.search(data)
        if prompt is None and completion is None:
            return
        self._usage_seen = True
        stats = self._stats
        if prompt is not None:
            stats.prompt_tokens += int(prompt.group(1))
        if completion is not None:
            stats.completion_tokens += int(completion.group(1))

    def on_end(self) -> None:
        if not self.sse:
            if b'"usage"' in self._tail:
                self._read_usage(self._tail[self._tail.rfind(b'"usage"') :])
            return
        if not self._usage_seen and self._events:
            # A usage chunk may be counted as an event; without usage, chunks stand in.
            self._stats.completion_tokens_estimated += self._events
