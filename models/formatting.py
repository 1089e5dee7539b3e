"""One formatting path, shared by the trainer and the service.

A prompt (a string or a list of chat messages) and one response become token ids built with the
backbone tokenizer's chat template: the response is the final assistant turn, closed by the
end-of-turn token that the reward is read at. Truncation always keeps the end of the response.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

ROLES = ("system", "user", "assistant")
Truncation = Literal["left", "error"]
Message = dict[str, str]
Prompt = str | Sequence[Mapping[str, Any]]


class FormattingError(ValueError):
    """Input that cannot be formatted; `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, response) sequence.

    `prompt_len` is the number of leading ids that are the prompt alone (an exact token prefix of
    `ids`); it is 0 when the prompt's own tokenization is not a prefix of the full sequence, or when
    truncation cut into the response.
    """

    ids: list[int]
    prompt_len: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def normalize_prompt(prompt: Prompt, param: str = "prompt") -> list[Message]:
    """A string becomes one user turn; a message list is checked (roles, content types)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence):
        raise FormattingError(f"{param} must be a string or a list of messages, got {type(prompt).__name__}", param)
    messages: list[Message] = []
    for i, m in enumerate(prompt):
        where = f"{param}[{i}]"
        if not isinstance(m, Mapping):
            raise FormattingError(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise FormattingError(f"{where}.role is {role!r}; allowed roles are {', '.join(ROLES)}", where)
        if not isinstance(content, str):
            raise FormattingError(f"{where}.content must be a string", where)
        messages.append({"role": str(role), "content": content})
    if not messages:
        raise FormattingError(f"{param} is an empty message list; give at least one message", param)
    if messages[-1]["role"] == "assistant":
        raise FormattingError(f"{param} ends with an assistant turn; the response to score is given separately", param)
    return messages


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(transcript: str) -> list[Message]:
    """Parse an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into chat messages."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    parts = _HH_TURN.split(text)
    # parts = [before, speaker, text, speaker, text, ...]
    if parts[0].strip():
        raise FormattingError("transcript does not start with a Human: or Assistant: turn", "transcript")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if not messages:
        raise FormattingError("transcript has no Human:/Assistant: turns", "transcript")
    return messages


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split an HH-RLHF pair into (shared prompt messages, chosen response, rejected response).

    The prompt is the dialogue the two transcripts share, up to the last "\n\nAssistant:" inside
    their common prefix; each response is what follows that marker on its side.
    """
    marker = "\n\nAssistant:"
    n = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected))
    )
    cut = chosen.rfind(marker, 0, n)
    if cut < 0:
        raise FormattingError("chosen and rejected share no dialogue up to an Assistant turn", "rejected")
    prompt = parse_hh_transcript(chosen[:cut])
    if prompt[-1]["role"] != "user":
        raise FormattingError("the shared dialogue does not end with a Human turn", "chosen")
    start = cut + len(marker)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


def _plain_render(messages: Sequence[Message]) -> str:
    names = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)


class Formatter:
    """Formats (prompt, response) pairs into token ids for the reward model.

    Args:
        tokenizer: the backbone's Hugging Face tokenizer.
        max_length: most tokens per sequence, the scored token included.
        truncation: what to do when the response alone is longer than `max_length`: "left" cuts its
            start, "error" refuses.
    """

    def __init__(self, tokenizer: Any, max_length: int = 1024, truncation: Truncation = "left") -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {max_length}")
        if truncation not in ("left", "error"):
            raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation: Truncation = truncation
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eot_token: str | None = tokenizer.eos_token
        self.eot_id: int | None = tokenizer.eos_token_id

    # -- text rendering -------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], response: str) -> tuple[str, str]:
        """Return (prompt text, response text) whose concatenation is the full sequence's text."""
        if self.has_template:
            prompt_text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            if not full.startswith(prompt_text):
                # Templates that rewrite earlier turns: fall back to the full text as the response part.
                return "", self._close(full)
            return prompt_text, self._close(full[len(prompt_text) :])
        return _plain_render(messages) + "\n\nAssistant:", self._close(" " + response)

    def _close(self, response_text: str) -> str:
        """End the response at its end-of-turn token (the scored token), dropping what follows it."""
        if self.eot_token:
            cut = response_text.rfind(self.eot_token)
            if cut >= 0:
                return response_text[: cut + len(self.eot_token)]
            return response_text + self.eot_token
        return response_text

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, response: str, param: str = "response") -> Encoded:
        """Token ids for one (prompt, response), truncated to `max_length` keeping the response's end."""
        if not isinstance(response, str):
            raise FormattingError(f"{param} must be a string", param)
        messages = normalize_prompt(prompt)
        prompt_text, response_text = self.render(messages, response)
        full_ids = self._ids(prompt_text + response_text)
        prompt_ids = self._ids(prompt_text)
        is_prefix = full_ids[: len(prompt_ids)] == prompt_ids
        if len(full_ids) <= self.max_length:
            return Encoded(full_ids, len(prompt_ids) if is_prefix else 0, False)
        return self._truncate(messages, response, param)

    def _truncate(self, messages: list[Message], response: str, param: str) -> Encoded:
        # 1. Drop the oldest turns (a leading system message stays) while more than the last user turn remains.
        msgs = list(messages)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        while len(msgs) - first > 1:
            del msgs[first]
            prompt_text, response_text = self.render(msgs, response)
            full_ids = self._ids(prompt_text + response_text)
            if len(full_ids) <= self.max_length:
                prompt_ids = self._ids(prompt_text)
                ok = full_ids[: len(prompt_ids)] == prompt_ids
                return Encoded(full_ids, len(prompt_ids) if ok else 0, True)
        # 2. Cut prompt tokens from the left.
        prompt_text, response_text = self.render(msgs, response)
        prompt_ids, response_ids = self._ids(prompt_text), self._ids(response_text)
        room = self.max_length - len(response_ids)
        if room > 0:
            return Encoded(prompt_ids[len(prompt_ids) - room :] + response_ids, room, True)
        # 3. The response alone is too long.
        if self.truncation == "error":
            raise FormattingError(
                f"{param} is {len(response_ids):,} tokens; max_length is {self.max_length:,} and "
                "truncation='error' was asked (use truncation='left' to keep its end)",
                param,
            )
        return Encoded(response_ids[-self.max_length :], 0, True)

    def encode_text(self, text: str, param: str = "query") -> Encoded:
        """Already-templated text scored as given (no special tokens added), reward at its last token."""
        if not isinstance(text, str):
            raise FormattingError(f"{param} must be a string", param)
        ids = self._ids(text)
        if not ids:
            raise FormattingError(f"{param} is empty after tokenization; give non-empty text", param)
        if len(ids) <= self.max_length:
            return Encoded(ids, 0, False)
        if self.truncation == "error":
            raise FormattingError(
                f"{param} is {len(ids):,} tokens; max_length is {self.max_length:,} and truncation='error' was asked",
                param,
            )
        return Encoded(ids[-self.max_length :], 0, True)

    def describe(self) -> dict[str, Any]:
        return {
            "chat_template": self.has_template,
            "max_length": self.max_length,
            "truncation": self.truncation,
            "end_of_turn": self.eot_token,
        }
