"""Tests for backends.openai_api: the approximate, prefix-stable tokenisation of prompts."""

from __future__ import annotations

import pytest

from backends.openai_api import TextTokens, parse_completion_request


def test_text_is_cut_into_four_character_tokens_the_last_shorter() -> None:
    """TextTokens splits text every 4 characters and counts len(text) / 4 rounded up."""
    tokens = TextTokens("abcdefghij")
    assert len(tokens) == 3
    assert list(tokens) == ["abcd", "efgh", "ij"]
    assert tokens[-1] == "ij"
    assert tokens[1:3] == ("efgh", "ij")
    assert len(TextTokens("")) == 0
    with pytest.raises(IndexError):
        tokens[3]


def test_texts_sharing_a_prefix_share_its_tokens() -> None:
    """Two texts agreeing on their first 10 characters agree on their first 2 tokens."""
    a, b = TextTokens("0123456789-alice"), TextTokens("0123456789-bob")
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_a_chat_prompt_is_every_message_with_its_role_in_order() -> None:
    """Messages become "<role>: <content>\\n" in order, text parts joined, then tokenised."""
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]},
        ]
    }
    req = parse_completion_request(body, chat=True)
    text = "system: Be brief.\nuser: Hi\n"
    assert isinstance(req.tokens, TextTokens)
    assert req.tokens.text == text
    assert req.prompt_tokens == 7 == -(-len(text) // 4)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("abcdefgh", ("abcd", "efgh")),
        (["abc", "defgh"], ("abcd", "efgh")),
        ([5, 6, 7], (5, 6, 7)),
        ([[5, 6], [7]], (5, 6, 7)),
    ],
)
def test_a_completion_prompt_is_its_text_or_its_token_ids(
    prompt: object, expected: tuple[object, ...]
) -> None:
    """Prompt strings are joined and tokenised; token ids are the tokens, one each."""
    req = parse_completion_request({"prompt": prompt}, chat=False)
    assert tuple(req.tokens) == expected
    assert req.prompt_tokens == len(expected)
