"""OpenAI wire format: request parsing, response and chunk shapes, OpenAI error bodies."""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

from aiohttp import web

from backends.prefix_cache import Tokens

DEFAULT_MAX_TOKENS = 16
CHARS_PER_TOKEN = 4


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TextTokens(Sequence[str]):
    """``text`` as the simulation tokenises it: tokens of 4 characters, the last may be shorter.

    Approximate but prefix-stable, which is what prefix caching needs: two texts sharing their
    first ``n`` characters share their first ``n // 4`` tokens. A view rather than a list, so
    a long prompt does not become millions of small strings.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __len__(self) -> int:
        return -(-len(self.text) // CHARS_PER_TOKEN)  # len(text) / 4 rounded up

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self._token(i) for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("token index out of range")
        return self._token(index)

    def _token(self, index: int) -> str:
        start = index * CHARS_PER_TOKEN
        return self.text[start : start + CHARS_PER_TOKEN]


def token_id(token: str) -> int:
    """The id of a token text: its CRC-32, below 2**31. Deterministic across processes
    (unlike ``hash``), so every replica gives a prompt the same ids."""
    return zlib.crc32(token.encode("utf-8", "surrogatepass")) & 0x7FFFFFFF


def token_ids(tokens: Tokens) -> list[int]:
    """Ids of a tokenised prompt: :func:`token_id` of each token text; ids stay as they are."""
    return [token if isinstance(token, int) else token_id(str(token)) for token in tokens]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """The parts of an OpenAI completion request the simulation uses."""

    chat: bool
    tokens: Tokens  # the prompt, tokenised
    max_tokens: int
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens, as reported in ``usage``."""
        return len(self.tokens)


async def read_json(request: web.Request) -> object:
    """The request body decoded as JSON; raise ``ValueError`` if it is not valid JSON."""
    try:
        return json.loads(await request.read())
    except ValueError as exc:  # also covers bad UTF-8
        raise ValueError(f"invalid JSON body: {exc}") from None


def parse_completion_request(body: object, *, chat: bool) -> CompletionRequest:
    """Validate a decoded JSON body; raise ``ValueError`` with an OpenAI-style message.

    The prompt is tokenised by :class:`TextTokens`, so it counts ``len(text) / 4`` tokens
    rounded up. For a chat, ``text`` is every message as ``"<role>: <content>\n"`` in order
    (``"system: ...\nuser: ...\n"``); for a completion, the prompt strings joined. A prompt
    of token ids is its ids, one token each. ``max_tokens`` (or ``max_completion_tokens``)
    defaults to ``DEFAULT_MAX_TOKENS``.
    """
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    tokens = parse_prompt(body, chat=chat)
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
    return CompletionRequest(chat, tokens, max_tokens, stream, include_usage)


def parse_prompt(body: dict[str, Any], *, chat: bool) -> Tokens:
    """The tokenised prompt of a decoded body: its ``messages`` (chat) or its ``prompt``.

    Raise ``ValueError`` with an OpenAI-style message when it is missing or malformed.
    """
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty array")
        return TextTokens("".join(_message_text(m) for m in messages))
    return _prompt(body.get("prompt"))


def _message_text(message: object) -> str:
    """``"<role>: <content>\n"``, the message as the prompt text holds it."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError("each message must be an object with a string 'role'")
    content = message.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):  # content parts: [{"type": "text", "text": "..."}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        text = "".join(t for t in texts if isinstance(t, str))
    else:
        raise ValueError("message 'content' must be a string or an array of parts")
    return f"{message['role']}: {text}\n"


def _prompt(prompt: object) -> Tokens:
    if isinstance(prompt, str):
        return TextTokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return TextTokens("".join(prompt))
        if all(_is_int(p) for p in prompt):
            return tuple(prompt)
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return tuple(t for p in prompt for t in p)
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
