"""Reading an OpenAI-style request body: the model, the user and the prompt text of chat,
completion and embedding requests, and the errors for bodies that are not JSON objects."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lb.openai_body import BodyFields, parse_body


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_a_chat_prompt_is_every_message_as_role_and_content_lines_in_order() -> None:
    """Every message of a chat becomes one ``role: content`` line, in the order sent."""
    fields = parse_body(
        body(
            model="llama",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
        )
    )
    assert fields.prompt == "system: Be brief.\nuser: Hi\nassistant: Hello!\nuser: Bye"


def test_chat_content_given_as_text_parts_is_joined() -> None:
    """A message whose content is a list of parts contributes the text of its text parts."""
    fields = parse_body(
        body(
            messages=[
                {"role": "system", "content": "S"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look at "},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                        {"type": "text", "text": "this"},
                    ],
                },
            ]
        )
    )
    assert fields.prompt == "system: S\nuser: look at this"


def test_a_completion_prompt_string_is_the_prompt_as_it_is() -> None:
    """The ``prompt`` string of a completion request is the prompt, unchanged."""
    assert parse_body(body(model="m", prompt="Once upon a time")).prompt == "Once upon a time"


def test_a_completion_prompt_list_of_strings_is_joined_by_lines() -> None:
    """A ``prompt`` given as a list of strings is those strings, one per line."""
    assert parse_body(body(prompt=["first", "second"])).prompt == "first\nsecond"


def test_a_completion_prompt_of_token_ids_is_the_ids_as_text() -> None:
    """A ``prompt`` of token ids is the ids separated by spaces, so it stays prefix-stable."""
    assert parse_body(body(prompt=[101, 7592, 2088])).prompt == "101 7592 2088"


def test_an_embeddings_input_string_is_the_prompt() -> None:
    """The ``input`` of an embeddings request is taken as its prompt."""
    fields = parse_body(body(model="embed", input="a sentence to embed"))
    assert fields.prompt == "a sentence to embed"
    assert fields.model == "embed"


def test_a_responses_api_prompt_is_its_instructions_then_its_input_messages() -> None:
    """The Responses API's ``instructions`` are its system prompt, and ``input`` may be a
    list of messages with text parts: both make the prompt, in that order."""
    fields = parse_body(
        body(
            model="m",
            instructions="Be brief.",
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello!"},
            ],
        )
    )
    assert fields.prompt == "system: Be brief.\nuser: Hi\nassistant: Hello!"
    assert parse_body(body(model="m", input="Hi", instructions="S")).prompt == "system: S\nHi"


def test_an_embeddings_input_list_of_texts_is_the_texts_by_lines() -> None:
    """Several texts to embed at once make one prompt, one per line."""
    assert parse_body(body(model="e", input=["one", "two"])).prompt == "one\ntwo"


def test_model_user_and_stream_are_extracted() -> None:
    """``model``, ``user`` and ``stream: true`` are read from the body."""
    fields = parse_body(body(model="llama", user="alice", stream=True, prompt="x"))
    assert fields == BodyFields(model="llama", user="alice", prompt="x", stream=True)


def test_fields_that_are_absent_or_not_strings_are_none() -> None:
    """A missing model or a model, user or prompt of the wrong type reads as ``None``; a
    model that is there but no string says so, for the error the client gets."""
    assert parse_body(b"{}") == BodyFields()
    assert parse_body(body(model=3, user=["u"], prompt={"a": 1})) == BodyFields(
        model_problem="'model' must be a string (got a number)"
    )
    assert parse_body(body(model=None)) == BodyFields()


def test_invalid_json_raises_value_error() -> None:
    """A body that is not JSON raises ``ValueError``."""
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_body(b'{"model": "llama",')


def test_a_body_that_is_not_utf8_raises_value_error() -> None:
    """A body that is not UTF-8 text raises ``ValueError``, not a decoding error."""
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_body(b'{"model": "\xff"}')


@pytest.mark.parametrize("data", [b"[]", b'"llama"', b"42", b"null"])
def test_a_json_value_that_is_not_an_object_raises_value_error(data: bytes) -> None:
    """A JSON array, string, number or null raises ``ValueError``."""
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_body(data)


def test_an_integer_longer_than_python_converts_does_not_hide_the_model() -> None:
    """A number of 5,000 digits is valid JSON: the model is still read (the number is kept
    as its digits), where converting it would fail on the interpreter's 4,300-digit limit."""
    data = b'{"seed": ' + b"7" * 5000 + b', "model": "llama", "prompt": [1, 2]}'
    fields = parse_body(data)
    assert fields.model == "llama"
    assert fields.prompt == "1 2"
