from __future__ import annotations

from typing import Any

import pytest

from models.formatting import (
    Formatter,
    FormattingError,
    normalize_prompt,
    parse_hh_transcript,
    split_hh_pair,
)


def test_three_turn_conversation_matches_chat_template(tokenizer: Any) -> None:
    msgs = [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour and water."},
        {"role": "user", "content": "And then?"},
    ]
    enc = Formatter(tokenizer, max_length=256).encode(msgs, "Knead and bake.")
    # What the chat template says, closed right after the final end-of-turn token.
    text = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": "Knead and bake."}], tokenize=False)
    text = text[: text.rindex("<|im_end|>") + len("<|im_end|>")]
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert enc.ids == expected
    assert enc.ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = tokenizer(
        tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )["input_ids"]
    assert enc.prompt_len == len(prompt_ids) and enc.ids[: enc.prompt_len] == prompt_ids
    assert not enc.truncated


def test_string_prompt_is_one_user_turn(tokenizer: Any) -> None:
    f = Formatter(tokenizer, max_length=256)
    assert f.encode("Hi there", "Hello").ids == f.encode([{"role": "user", "content": "Hi there"}], "Hello").ids


def test_truncation_keeps_scored_token_and_drops_oldest_turns(tokenizer: Any) -> None:
    f = Formatter(tokenizer, max_length=48)
    long_turns = [
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 3},
        {"role": "assistant", "content": "Reward models score answers. " * 3},
        {"role": "user", "content": "Thanks for asking!"},
    ]
    enc = f.encode(long_turns, "GOOD answers are helpful.")
    assert enc.truncated
    assert len(enc.ids) <= 48
    assert enc.ids[-1] == tokenizer.eos_token_id
    full = Formatter(tokenizer, max_length=4096).encode(long_turns, "GOOD answers are helpful.")
    resp_ids = full.ids[full.prompt_len :]
    assert enc.ids[-len(resp_ids) :] == resp_ids  # the whole response survived
    assert "Thanks for asking!" in tokenizer.decode(enc.ids)  # the last user turn survived


def test_response_longer_than_max_length(tokenizer: Any) -> None:
    long = "Reward models score answers; better answers get higher scores. " * 20
    enc = Formatter(tokenizer, max_length=32, truncation="left").encode("Hi", long)
    assert len(enc.ids) == 32 and enc.truncated and enc.prompt_len == 0
    assert enc.ids[-1] == tokenizer.eos_token_id
    with pytest.raises(FormattingError, match="max_length is 32"):
        Formatter(tokenizer, max_length=32, truncation="error").encode("Hi", long)


def test_plain_fallback_without_template() -> None:
    from tests.tiny import make_tokenizer

    tok = make_tokenizer(chat_template=False)
    enc = Formatter(tok, max_length=128).encode("How do I bake bread?", "Mix flour.")
    text = tok.decode(enc.ids)
    assert text == "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.<|endoftext|>"
    assert enc.ids[-1] == tok.eos_token_id


def test_encode_text_scores_as_given(tokenizer: Any) -> None:
    f = Formatter(tokenizer, max_length=64)
    enc = f.encode_text("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>")
    assert tokenizer.decode(enc.ids).endswith("hello<|im_end|>")
    with pytest.raises(FormattingError):
        f.encode_text("")


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([{"role": "robot", "content": "x"}], "allowed roles"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([], "empty message list"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with an assistant"),
        (5, "must be a string or a list"),
    ],
)
def test_bad_prompts_name_the_problem(prompt: Any, match: str) -> None:
    with pytest.raises(FormattingError, match=match):
        normalize_prompt(prompt)


def test_hh_transcript_parses_into_messages() -> None:
    t = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
    assert parse_hh_transcript(t) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
    ]
    prompt, c, r = split_hh_pair(t, t.replace("Fine.", "Bad, thanks for nothing."))
    assert prompt[-1] == {"role": "user", "content": "How are you?"} and len(prompt) == 3
    assert (c, r) == ("Fine.", "Bad, thanks for nothing.")
