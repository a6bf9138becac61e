"""OpenAI wire format: request parsing, response and chunk shapes, OpenAI error bodies."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

DEFAULT_MAX_TOKENS = 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """The parts of an OpenAI completion request the simulation uses."""

    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


async def read_json(request: web.Request) -> object:
    """The request body decoded as JSON; raise ``ValueError`` if it is not valid JSON."""
    try:
        return json.loads(await request.read())
    except ValueError as exc:  # also covers bad UTF-8
        raise ValueError(f"invalid JSON body: {exc}") from None


def parse_completion_request(body: object, *, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body; raise ``ValueError`` with an OpenAI-style message.

    Prompt tokens are approximated as ``len(text) // 4 + 1`` over all messages' content (or
    all prompt strings) joined; a prompt of token ids counts one token per id. ``max_tokens``
    (or ``max_completion_tokens``) defaults to ``DEFAULT_MAX_TOKENS``.
    """
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty array")
        texts = [_message_text(m) for m in messages]
        prompt_tokens = len("".join(texts)) // 4 + 1
    else:
        prompt_tokens = _prompt_tokens(body.get("prompt"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not _is_int(max_tokens) or max_tokens < 1:
        raise ValueError("'max_tokens' must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValueError("'stream' must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ValueError("'stream_options' must be an object with a boolean 'include_usage'")
    include_usage = stream and options.get("include_usage", False)
    return CompletionRequest(chat, prompt_tokens, max_tokens, stream, include_usage)


def _message_text(message: object) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message must be an object with a string 'role'")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(t for t in texts if isinstance(t, str))
    raise ValueError("message 'content' must be a string or an array of parts")


def _prompt_tokens(prompt: object) -> int:
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return len("".join(prompt)) // 4 + 1
        if all(_is_int(p) for p in prompt):
            return len(prompt)
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)
    raise ValueError("'prompt' must be a string, an array of strings or an array of token ids")


class CompletionShape:
    """Builds the OpenAI response objects of one request (chat or text completion).

    Every response finishes with ``"length"``: the simulation always generates ``max_tokens``.
    """

    def __init__(self, req: CompletionRequest, model: str):
        self.req = req
        self.model = model
        self.id = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def usage(self, completion_tokens: int) -> dict[str, int]:
        p = self.req.prompt_tokens
        return {
            "prompt_tokens": p,
            "completion_tokens": completion_tokens,
            "total_tokens": p + completion_tokens,
        }

    def full(self, text: str, completion_tokens: int) -> dict[str, Any]:
        """The non-streaming response."""
        if self.req.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice, kind = {"index": 0, "text": text}, "text_completion"
        choice.update(logprobs=None, finish_reason="length")
        return self._object(kind, [choice], usage=self.usage(completion_tokens))

    def chunk(self, text: str | None, *, first: bool = False) -> dict[str, Any]:
        """A streaming chunk carrying ``text``, or the final chunk when ``text`` is None."""
        reason = "length" if text is None else None
        if not self.req.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return self._object("text_completion", [choice])
        delta: dict[str, str] = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return self._object("chat.completion.chunk", [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.req.chat else "text_completion"
        return self._object(kind, [], usage=self.usage(completion_tokens))


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def openai_error(status: int, message: str) -> web.Response:
    """An error response in OpenAI's shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    body = {"error": {"message": message, "type": kind, "code": None}}
    return web.json_response(body, status=status)
