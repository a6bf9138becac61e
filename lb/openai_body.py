"""Reading an OpenAI-style request body: the model, the user, and the prompt text.

Only what routing needs is taken from the JSON, and the body itself is forwarded byte for byte.
The prompt is the text of every message in order, each as ``role: content`` on its own line
(the ``prompt`` of a completion as it is), so prefix-affinity keys cover the whole
conversation and not only its first message.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

_JSON_TYPES: dict[type, str] = {
    int: "a number",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


@dataclass(frozen=True, slots=True)
class BodyFields:
    """The routing-relevant fields of a request body; ``None`` where absent."""

    model: str | None = None
    user: str | None = None
    prompt: str | None = None
    stream: bool = False
    # Why a ``model`` the body has is unusable (it is no string), else None.
    model_problem: str | None = None


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url"...}]
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _message_lines(messages: list[Any]) -> list[str]:
    lines = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            role = role if isinstance(role, str) else ""
            lines.append(f"{role}: {_content_text(message.get('content'))}")
    return lines


def prompt_text(body: dict[str, Any]) -> str | None:
    """The prompt of a chat (all messages, in order), a completion, a Responses API request
    (its ``instructions``, then its ``input`` text or messages) or an embeddings request."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(_message_lines(messages))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return " ".join(str(t) for t in prompt)  # token ids: still prefix-stable
    text = body.get("input")  # the Responses API, embeddings
    instructions = body.get("instructions")
    lines = [f"system: {instructions}"] if isinstance(instructions, str) else []
    if isinstance(text, str):
        lines.append(text)
    elif isinstance(text, list) and text:
        if all(isinstance(t, str) for t in text):
            lines.extend(text)  # several texts to embed
        else:
            lines.extend(_message_lines(text))  # a Responses API conversation
    return "\n".join(lines) if lines else None


def _digits(text: str) -> int | str:
    """An integer literal as a number, or as its digits if it is too long to convert."""
    limit = sys.get_int_max_str_digits()
    return int(text) if limit == 0 or len(text) <= limit else text


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise
    except ValueError:
        # Valid JSON with an integer longer than the interpreter converts (4,300 digits): no
        # field routing reads is such a number, so parse again keeping long ones as text.
        return json.loads(data, parse_int=_digits)


def parse_body(data: bytes) -> BodyFields:
    """The fields of a JSON request body; raises ``ValueError`` if it is not a JSON object."""
    try:
        body = _loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the interpreter's stack: not a request body
        raise ValueError("request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ValueError("request body is not a JSON object")
    model = body.get("model")
    user = body.get("user")
    problem = None
    if model is not None and not isinstance(model, str):
        problem = f"'model' must be a string (got {_JSON_TYPES.get(type(model), 'a value')})"
    return BodyFields(
        model=model if isinstance(model, str) else None,
        user=user if isinstance(user, str) else None,
        prompt=prompt_text(body),
        stream=body.get("stream") is True,
        model_problem=problem,
    )
