"""One formatting path, shared by the trainer, `rmserve eval` and every service route.

A prompt (a message list, or a string) and one answer become token ids built with the backbone
tokenizer's chat template: the answer is the final assistant turn, closed as the checkpoint's
`RewardRule` says (rmserve's own: by the end-of-turn token; transformers/TRL: the template's whole
rendering; OpenRLHF: eos after the generation prompt and answer), and the ids end at the token the
reward is read at. A reward is a function of (prompt, answer) alone, so the path normalizes:

- **What counts as content.** Leading and trailing whitespace of the answer and of every message
  content is not content: it is stripped. `"Paris."`, `"Paris.\\n"` and `"  Paris.  \\n\\n"` give the
  same ids.
- **Content is text.** Special-token strings inside any content (`<|im_end|>`, `<|im_start|>`,
  `<|eot_id|>`, `</s>`, ...) are tokenized as plain text, never as control tokens; only the chat
  template's own markers are control tokens. The template is rendered once with a unique sentinel in
  place of each content; the rendered text is split at the sentinels, the template's pieces are
  tokenized normally and each content with special-token matching switched off, and the ids are
  concatenated. For ordinary text this gives the ids of tokenizing the whole rendered text.
- **Templated text** (`encode_text`, what OpenRLHF sends to `/get_reward`) is parsed back into
  (messages, answer) by `Formatter.parse_templated` and then encoded like any other pair, so
  `encode_text(text) == encode(*parse_templated(text))`. Pad and eos tokens and whitespace on either
  side are removed and exactly one end-of-turn closes the answer. The role markers are learned from
  the tokenizer's own template (a probe conversation rendered with sentinels), not hard-coded. When
  the templated prompt is given too (OpenRLHF's `prompts`) and is a prefix of the text, the answer
  is everything after it, marker strings included, as text. Without it the answer starts after the
  first assistant marker that follows the LAST user marker (so an answer that spells out only
  end-of-turn and assistant markers stays text), and this is the only place where an answer that
  also spells out a user turn can change how the text is split: send the prompt to rule that out.
  A system message is recognized at the start of the conversation only.
- **Text without the template's markers** (or any text for a tokenizer without a chat template) is
  parsed as an HH-RLHF transcript when it has `"\\n\\nHuman:"` and `"\\n\\nAssistant:"` turns (the
  answer is what follows the last `"\\n\\nAssistant:"`); otherwise it is scored as plain text: its
  stripped content then one end-of-turn token, no template.
- **Templated prompt strings.** A prompt *string* given to `encode` that begins like the template's
  conversations (its preamble, a system turn or a user turn; pads, bos and whitespace aside) is parsed
  as the templated prompt (the same parse as above), so `encode(p, a) == encode_text(p + a, prompt=p)`.
  Any other string, one that mentions a marker later on included, is one user turn (markers as text).
- **Truncation keeps the question**, in linear time: each content is tokenized once and cuts are
  made by token counts. While the sequence is longer than `max_length`, the oldest turns are dropped
  (a leading system message stays; whole user-led turns, so roles still alternate) until only the
  last user turn and what follows it remain. If that is still too long, contents are cut from their
  start (their end survives): the answer keeps as much as leaves the final user message at least
  `QUESTION_SHARE` of `max_length` (or all of it, if shorter), the final user message keeps what is
  left, then earlier contents (a system message). The template's markers and the answer's
  end-of-turn token are never cut. `truncation="error"` refuses any cut with a `TooLongError`.
  A content far longer than `max_length` is tokenized only over its last `max_length * 8`
  characters (it can never fit whole; only its end is ever kept).
- Text that is not valid Unicode (a lone surrogate such as `"\\ud800"`) is a `FormattingError`
  naming the field.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Truncation = Literal["left", "error"]
Message = dict[str, str]
Prompt = str | Sequence[Mapping[str, Any]]

QUESTION_SHARE = 0.25
"""Share of `max_length` that the final user message keeps (its end) when the answer alone is too long."""

_WINDOW_CHARS_PER_TOKEN = 8
"""A content longer than `max_length * 8` characters is tokenized over its tail only (see `_content_ids`)."""

_SENTINEL = "\ue000{}\ue001"  # private-use code points: never produced by a template
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ASSISTANT = "\n\nAssistant:"


class FormattingError(ValueError):
    """Input that cannot be formatted; `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TooLongError(FormattingError):
    """The sequence is longer than `limit` and truncation="error" was asked (the service answers 413)."""

    def __init__(self, message: str, param: str | None, length: int, limit: int) -> None:
        super().__init__(message, param)
        self.length = length
        self.limit = limit


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, answer) sequence.

    `prompt_len` is the number of leading ids that are the prompt (the template up to where the
    answer's content starts): an exact token prefix of `ids`, identical for every answer to the same
    prompt unless truncation cut the prompt. `truncated` is true whenever anything was cut.
    """

    ids: list[int]
    prompt_len: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def check_text(text: Any, param: str) -> str:
    """`text` itself when it is a string that can be encoded as UTF-8, else a FormattingError naming `param`."""
    if not isinstance(text, str):
        raise FormattingError(f"{param} must be a string, got {type(text).__name__}", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormattingError(
            f"{param} is not valid Unicode text: {e.reason} at character {e.start} ({text[e.start]!r}); "
            "send UTF-8 encodable text",
            param,
        ) from None
    return text


def normalize_prompt(prompt: Prompt, param: str = "prompt", roles: Sequence[str] = ROLES) -> list[Message]:
    """A string becomes one user turn; a message list is checked (roles among `roles`, content types)."""
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
        if role not in roles:
            hint = "" if "tool" in roles or role != "tool" else " (this chat template has no tool role)"
            raise FormattingError(
                f"{where}.role is {role!r}; allowed roles are {', '.join(roles)}{hint}", f"{where}.role"
            )
        if not isinstance(content, str):
            raise FormattingError(f"{where}.content must be a string", where)
        messages.append({"role": str(role), "content": content})
    if not messages:
        raise FormattingError(f"{param} is an empty message list; give at least one message", param)
    if messages[-1]["role"] == "assistant":
        raise FormattingError(f"{param} ends with an assistant turn; the response to score is given separately", param)
    return messages


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
    n = next(
        (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), min(len(chosen), len(rejected))
    )
    cut = chosen.rfind(_HH_ASSISTANT, 0, n)
    if cut < 0:
        raise FormattingError("chosen and rejected share no dialogue up to an Assistant turn", "rejected")
    prompt = parse_hh_transcript(chosen[:cut])
    if prompt[-1]["role"] != "user":
        raise FormattingError("the shared dialogue does not end with a Human turn", "chosen")
    start = cut + len(_HH_ASSISTANT)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


Close = Literal["end_of_turn", "template", "eos"]


@dataclass(frozen=True)
class RewardRule:
    """What text a checkpoint's framework scores and at which token it reads the reward: data chosen once
    by the checkpoint loader (models/checkpoints/) and carried into the `Formatter`, so that the ids it
    makes END at the read token. Runtimes then read the last token of each sequence and know no format.

    `close`, how the answer is closed (with a chat template):
      - "end_of_turn" (rmserve): the template over the conversation, the answer's turn cut right after its
        first eos (the end-of-turn token, appended when the template has none there); read there.
      - "template" (transformers / TRL / reward-bench): the template over the whole conversation, no
        generation prompt, every character of it (trl/trainer/reward_trainer.py `tokenize_fn` ->
        trl/data_utils.py `_tokenize`: `apply_chat_template(prompt + chosen, tokenize=True)`).
      - "eos" (OpenRLHF): the prompt rendered with the generation prompt, the answer, then eos: what its
        PPO sends to a remote reward model (openrlhf/utils/agent.py decodes the prompt and generated ids,
        eos included; openrlhf/cli/serve_rm.py tokenizes with add_special_tokens=False).
      Without a chat template every rule scores the HH layout (`"\n\nHuman: q\n\nAssistant: a"`, a
      system turn as `"\n\nSystem: s"`) then eos, as TRL's `add_eos` and OpenRLHF's reward dataset append
      eos to plain text. Under "template" the ids the tokenizer adds to plain text (a BOS; an EOS its
      post-processor appends after that eos) surround them, as TRL tokenizes plain text with
      `processing_class(text=...)` (trl/data_utils.py `_tokenize`, special tokens on); OpenRLHF tokenizes
      with add_special_tokens=False and rmserve adds none. Truncation never cuts those ids.

    `skip_id`: transformers' `*ForSequenceClassification.forward` reads the rightmost token that is not
    `config.pad_token_id` (transformers/modeling_layers.py `GenericForSequenceClassification`): trailing
    ids equal to `skip_id` are dropped from the sequence's end, so the last id is the one transformers
    reads (the model is causal: the hidden state there does not change). None: the last token is read.

    `whole_text`: the rendered text is tokenized as one string, as `apply_chat_template` and the frameworks
    do (see `Formatter._assemble`); False only for rmserve directories written before that (their models
    were trained on the template pieces and contents tokenized apart, which they keep).
    """

    name: str = "rmserve"
    close: Close = "end_of_turn"
    skip_id: int | None = None
    whole_text: bool = True

    def __post_init__(self) -> None:
        if self.close not in ("end_of_turn", "template", "eos"):
            raise ValueError(f"rule.close must be 'end_of_turn', 'template' or 'eos', got {self.close!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "close": self.close, "skip_id": self.skip_id, "whole_text": self.whole_text}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RewardRule:
        """The rule a model directory recorded. A record without `whole_text` was written before ids were
        the whole text's (issue 30): its model was trained on the pieces tokenized apart, so it keeps them."""
        d = d or {}
        skip = d.get("skip_id")
        return cls(
            str(d.get("name", "rmserve")),
            d.get("close", "end_of_turn"),
            None if skip is None else int(skip),
            bool(d.get("whole_text", False)),
        )


RMSERVE_RULE = RewardRule()


@dataclass(frozen=True)
class TemplateMarkers:
    """The chat template's role markers, learned by rendering probe conversations with sentinels.

    Markers are stored stripped of surrounding whitespace (content is stripped too, so whitespace
    between a marker and its content carries nothing).
    """

    open_user: str
    open_assistant: str
    close_user: str
    close_assistant: str
    preamble: str  # what precedes the first user turn when there is no system message (a default system turn)
    open_system: str | None  # None when the template has no system turn of its own
    close_system: str | None


Piece = str | int  # template text, or the index of a content slot (len(messages) is the answer)


class Formatter:
    """Formats (prompt, answer) pairs into token ids for the reward model: the one canonical path.

    Args:
        tokenizer: the backbone's Hugging Face tokenizer (fast tokenizers use their `tokenizers`
            backend directly; slow ones go through `split_special_tokens`).
        max_length: most tokens per sequence, the scored token included.
        truncation: default for sequences longer than `max_length`: "left" cuts (see the module
            docstring for the order), "error" refuses with a `TooLongError`. Each call may override it.
        rule: what text the checkpoint's framework scores and where it reads (`RewardRule`); rmserve's own
            rule by default.
    """

    def __init__(
        self, tokenizer: Any, max_length: int = 1024, truncation: Truncation = "left", rule: RewardRule | None = None
    ) -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {max_length}")
        if truncation not in ("left", "error"):
            raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation: Truncation = truncation
        self.rule = rule or RMSERVE_RULE
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        template = getattr(tokenizer, "chat_template", None)
        self._original_template = unwrap_template(template) if isinstance(template, str) else None
        has_tool = isinstance(template, str) and ("'tool'" in template or '"tool"' in template)
        self.roles: tuple[str, ...] = (*ROLES, "tool") if has_tool else ROLES  # a tool turn only where rendered
        self.eot_token: str | None = tokenizer.eos_token
        self.eot_id: int | None = tokenizer.eos_token_id
        self._encode_template, self._encode_content = _encoders(tokenizer)
        self._encode_whole, self._control = _whole_encoder(tokenizer)
        self._piece_cache: dict[str, list[int]] = {}
        self._pads = [t for t in dict.fromkeys([tokenizer.pad_token, tokenizer.eos_token]) if t]
        self.markers = self._learn_markers() if self.has_template else None
        # Plain text under the transformers (TRL) rule: TRL tokenizes it with the tokenizer's special tokens
        # (trl/data_utils.py `_tokenize`: `processing_class(text=input)`), so the ids the post-processor puts
        # around it (a Llama-2/Mistral BOS; an EOS some append) are part of the framework's text. Templated
        # text carries its own (apply_chat_template tokenizes without them), OpenRLHF never adds them.
        self._around: tuple[list[int], list[int]] = ([], [])
        if not self.has_template and self.rule.close == "template":
            self._around = _special_ids_around(tokenizer)
        if self.has_template and self.markers is None:
            log.warning("could not learn the chat template's role markers: templated text is scored as plain text")

    # -- template rendering -----------------------------------------------------------------------
    def _render(self, messages: Sequence[Message], generation_prompt: bool = False, original: bool = False) -> str:
        """The chat template's text for `messages`; `original`: with the template rmserve's save wrapped
        (`closing_template`) unwrapped, as the checkpoint's family writes every turn (the role markers are
        learned from it: the wrapper changes only how an answered conversation ends)."""
        kw = {"chat_template": self._original_template} if original and self._original_template else {}
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt, **kw
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected text")
        return text

    def _layout(self, roles: Sequence[tuple[int, str]], n_answer: int, param: str = "prompt") -> list[Piece]:
        """Template pieces and content slots of the conversation `roles` ((slot, role) pairs) + the answer.

        The answer's slot `n_answer` comes last, followed by its end-of-turn text only.
        """
        if not self.has_template:
            names = {"system": "System", "user": "Human", "assistant": "Assistant"}
            plain: list[Piece] = []
            for slot, role in roles:
                plain += [f"\n\n{names[role]}:", slot]
            return [*plain, "\n\nAssistant:", n_answer, self.eot_token or ""]
        conv = [{"role": role, "content": _SENTINEL.format(slot)} for slot, role in roles]
        prompt_only = self.rule.close == "eos"  # OpenRLHF: the prompt with the generation prompt, answer, eos
        if not prompt_only:
            conv.append({"role": "assistant", "content": _SENTINEL.format(n_answer)})
        try:
            text = self._render(conv, generation_prompt=prompt_only)
        except Exception as e:  # jinja's TemplateError and raise_exception(): the template refused the roles
            raise FormattingError(f"the chat template refused this conversation: {e}", param) from None
        parts = _SENTINEL_RE.split(text)  # [text, slot, text, slot, ..., text]
        if prompt_only:
            parts += [str(n_answer), self.eot_token or ""]
        slots = [int(s) for s in parts[1::2]]
        if sorted(slots) != sorted([s for s, _ in roles] + [n_answer]) or slots[-1] != n_answer:
            raise FormattingError(
                "the chat template does not render each message's content exactly once with the answer last; "
                "this conversation cannot be formatted with it",
                param,
            )
        out: list[Piece] = [parts[0]]
        for slot, txt in zip(slots, parts[2::2], strict=True):
            out += [slot, txt]
        if self.rule.close == "end_of_turn":
            out[-1] = self._close(str(out[-1]))
        return [p for p in out if p != ""]

    def _close(self, tail: str) -> str:
        """The template text after the answer, up to and including its end-of-turn token (the scored token)."""
        if self.eot_token:
            cut = tail.find(self.eot_token)
            return tail[: cut + len(self.eot_token)] if cut >= 0 else tail + self.eot_token
        return tail

    def render(self, messages: Sequence[Message], response: str) -> tuple[str, str]:
        """(prompt text, answer text) of a pair, for reading; ids come from `encode` (content is text there)."""
        roles = [(i, m["role"]) for i, m in enumerate(messages)]
        contents = [*self._contents(messages), response.strip()]
        if not self.has_template:
            contents = [" " + c for c in contents]
        layout = self._layout(roles, len(messages))
        at = layout.index(len(messages))
        text = [p if isinstance(p, str) else contents[p] for p in layout]
        return "".join(text[:at]), "".join(text[at:])

    def _learn_markers(self) -> TemplateMarkers | None:
        s = _SENTINEL.format
        try:
            full = _SENTINEL_RE.split(
                self._render(
                    [
                        {"role": "user", "content": s(0)},
                        {"role": "assistant", "content": s(1)},
                        {"role": "user", "content": s(2)},
                        {"role": "assistant", "content": s(3)},
                    ],
                    original=True,
                )
            )
            one = [{"role": "user", "content": s(0)}]
            gen, nogen = self._render(one, True, original=True), self._render(one, False, original=True)
        except Exception as e:
            log.debug("probe conversation failed: %s", e)
            return None
        if full[1::2] != ["0", "1", "2", "3"] or not gen.startswith(nogen):
            return None
        head, u_a, a_u, u_a2, tail = full[0::2]
        open_a = gen[len(nogen) :]
        if u_a != u_a2 or not open_a.strip() or not u_a.endswith(open_a) or not a_u.startswith(tail):
            return None
        open_u = a_u[len(tail) :]
        if not open_u.strip() or not head.endswith(open_u):
            return None
        open_s = close_s = None
        try:
            sys_parts = _SENTINEL_RE.split(
                self._render([{"role": "system", "content": s(0)}, {"role": "user", "content": s(1)}], original=True)
            )
            if sys_parts[1::2] == ["0", "1"] and sys_parts[2].endswith(open_u) and sys_parts[0].strip():
                open_s, close_s = sys_parts[0].strip(), sys_parts[2][: -len(open_u)].strip()
        except Exception as e:  # templates without system turns raise here
            log.debug("the chat template has no system turn: %s", e)
        return TemplateMarkers(
            open_user=open_u.strip(),
            open_assistant=open_a.strip(),
            close_user=u_a[: -len(open_a)].strip(),
            close_assistant=tail.strip(),
            preamble=head[: -len(open_u)].strip(),
            open_system=open_s,
            close_system=close_s,
        )

    # -- tokenizing -------------------------------------------------------------------------------
    def _piece_ids(self, text: str) -> list[int]:
        ids = self._piece_cache.get(text)
        if ids is None:
            if len(self._piece_cache) > 4096:
                self._piece_cache.clear()
            ids = self._piece_cache[text] = self._encode_template(text)
        return ids

    def _content_ids(self, text: str) -> list[int]:
        """Ids of one content, special-token strings as text.

        A content longer than `max_length * 8` characters can never fit whole; it is tokenized over
        its tail only (the first token of that window dropped, as it may be a split word) when that
        window alone gives more than `max_length` tokens. Only its end is ever used then, and the
        count still tells every truncation rule that it does not fit.
        """
        window = self.max_length * _WINDOW_CHARS_PER_TOKEN
        if len(text) > window:
            ids = self._encode_content(text[-window:])[1:]
            if len(ids) > self.max_length:
                return ids
        return self._encode_content(text)

    @staticmethod
    def _contents(messages: Sequence[Message], param: str = "prompt") -> list[str]:
        return [check_text(m["content"], f"{param}[{i}].content").strip() for i, m in enumerate(messages)]

    # -- encoding ---------------------------------------------------------------------------------
    def encode(
        self,
        prompt: Prompt,
        response: str,
        param: str = "response",
        *,
        prompt_param: str = "prompt",
        truncation: Truncation | None = None,
    ) -> Encoded:
        """Token ids for one (prompt, answer), cut to `max_length` as the module docstring says.

        `param` and `prompt_param` name the answer and the prompt in errors; `truncation` overrides the
        formatter's default for this call.
        """
        answer = check_text(response, param).strip()
        if isinstance(prompt, str):
            check_text(prompt, prompt_param)
            if self._starts_templated(prompt):
                messages = self._parse_prompt(_lstrip_any(prompt, self._pads), prompt_param)
            else:
                messages = normalize_prompt(prompt, prompt_param, self.roles)
        else:
            messages = normalize_prompt(prompt, prompt_param, self.roles)
        return self._encode_messages(messages, answer, param, prompt_param, truncation or self.truncation)

    def _encode_messages(
        self, messages: list[Message], answer: str, param: str, prompt_param: str, truncation: Truncation
    ) -> Encoded:
        if truncation not in ("left", "error"):
            raise FormattingError(f"truncation must be 'left' or 'error', got {truncation!r}", "truncation")
        n = len(messages)
        contents = [*self._contents(messages, prompt_param), answer]
        if not self.has_template:
            contents = [" " + c for c in contents]
        ids = [self._content_ids(c) for c in contents]
        roles = [(i, m["role"]) for i, m in enumerate(messages)]
        layout = self._layout(roles, n, prompt_param)
        total = self._length(layout, ids)
        if total <= self.max_length:
            return self._assemble(layout, ids, {}, n, False, contents)
        if self.rule.whole_text and total - self.max_length <= len(layout):
            whole = self._whole_text_ids(layout, contents, n)  # None when it does not fit either
            if whole is not None:  # the pieces apart pass max_length by a boundary token or two; the text fits
                return Encoded(whole[0], whole[1], False)
        if truncation == "error":
            partial = any(len(c) > self.max_length * _WINDOW_CHARS_PER_TOKEN for c in contents)
            raise TooLongError(
                f"{param} with its prompt is {'at least ' if partial else ''}{total:,} tokens; max_length is "
                f"{self.max_length:,} and truncation='error' was asked (send a shorter prompt or answer, or "
                "truncation='left' to drop the oldest turns and cut the answer's start)",
                param,
                total,
                self.max_length,
            )
        # 1. Drop the oldest turns (a leading system message stays), whole user-led turns at a time.
        first = 1 if messages[0]["role"] == "system" else 0
        starts = [k for k in range(first + 1, n) if messages[k]["role"] == "user"]
        lo, hi, best = 0, len(starts) - 1, None
        while lo <= hi:  # the length falls as more turns are dropped: the fewest drops that fit
            mid = (lo + hi) // 2
            cand = self._layout(roles[:first] + roles[starts[mid] :], n)
            if self._length(cand, ids) <= self.max_length:
                best, hi = cand, mid - 1
            else:
                lo = mid + 1
        if best is not None:
            return self._assemble(best, ids, {}, n, True, contents)
        if starts:
            layout = self._layout(roles[:first] + roles[starts[-1] :], n)
        # 2. Cut contents from their start: the answer down to what leaves the question its share.
        slots = [p for p in layout if isinstance(p, int)]
        fixed = len(self._around[0]) + len(self._around[1])
        avail = self.max_length - fixed - sum(len(self._piece_ids(p)) for p in layout if isinstance(p, str))
        if avail <= 0:  # the template's own text does not fit: keep the sequence's end (and the leading specials)
            enc = self._assemble(layout, ids, {}, n, True)
            head = len(self._around[0])
            body = enc.ids[head:][-(self.max_length - head) :]
            return Encoded(self._end_at_read_token(enc.ids[:head] + body), 0, True)
        users = [s for s in slots if s < n and messages[s]["role"] == "user"]
        question = users[-1] if users else None
        q_len = len(ids[question]) if question is not None else 0
        keep = {n: min(len(ids[n]), max(0, avail - min(q_len, int(QUESTION_SHARE * self.max_length))))}
        left = avail - keep[n]
        for s in ([question] if question is not None else []) + [s for s in reversed(slots) if s not in (n, question)]:
            keep[s] = min(len(ids[s]), left)
            left -= keep[s]
        return self._assemble(layout, ids, keep, n, True)

    def _length(self, layout: Sequence[Piece], ids: Sequence[list[int]]) -> int:
        return (
            len(self._around[0])
            + len(self._around[1])
            + sum(len(self._piece_ids(p)) if isinstance(p, str) else len(ids[p]) for p in layout)
        )

    def _assemble(
        self,
        layout: Sequence[Piece],
        ids: Sequence[list[int]],
        keep: Mapping[int, int],
        n: int,
        truncated: bool,
        contents: Sequence[str] | None = None,
    ) -> Encoded:
        """The ids of `layout` with each content slot's ids (cut to its last `keep[slot]`).

        With `contents` (no content is cut), the text is tokenized as ONE string, as the frameworks do
        (`apply_chat_template(..., tokenize=True)`, TRL, OpenRLHF): a tokenizer's pre-tokenizer may
        split or merge across a template/content boundary (SmolLM2's splits `"\n\n"` before a letter
        in two; a space before a word joins it), and then only the whole-text ids are the framework's.
        Those ids are used unless a content would produce a control token there (a special-token
        string typed into text, which stays text: the piecewise ids), or they would pass `max_length`."""
        if contents is not None and not keep and self.rule.whole_text:
            whole = self._whole_text_ids(layout, contents, n)
            if whole is not None:
                return Encoded(whole[0], whole[1], truncated)
        out: list[int] = list(self._around[0])
        prompt_len = 0
        for p in layout:
            if isinstance(p, str):
                out += self._piece_ids(p)
                continue
            if p == n:
                prompt_len = len(out)
            k = keep.get(p, len(ids[p]))
            if k:
                out += ids[p][len(ids[p]) - k :]
        out = self._end_at_read_token(out + self._around[1])
        return Encoded(out, min(prompt_len, len(out)), truncated)

    def _whole_text_ids(self, layout: Sequence[Piece], contents: Sequence[str], n: int) -> tuple[list[int], int] | None:
        """(ids, prompt length) of the layout's text tokenized as one string, or None (see `_assemble`).

        The prompt length counts the tokens that end before the answer's first character, so the
        prompt ids are an exact prefix of the ids."""
        if self._encode_whole is None:
            return None
        spans: list[tuple[int, int]] = []
        parts: list[str] = []
        pos = answer_at = 0
        for p in layout:
            text = p if isinstance(p, str) else contents[p]
            if not isinstance(p, str):
                spans.append((pos, pos + len(text)))
                if p == n:
                    answer_at = pos
            parts.append(text)
            pos += len(text)
        text = "".join(parts)
        ids, offsets = self._encode_whole(text)
        inside = iter(sorted(spans))
        span = next(inside, None)
        prompt_len = 0
        for tid, (start, end) in zip(ids, offsets, strict=True):
            while span is not None and span[1] <= start:
                span = next(inside, None)
            literal = self._control.get(tid)
            if literal and span is not None and start < span[1] and end > span[0] and literal in text[start:end]:
                return None  # a control token typed into content: content is text, use the piecewise ids
            if end <= answer_at:
                prompt_len += 1
        head, tail = self._around
        out = self._end_at_read_token(head + ids + tail)
        if len(out) > self.max_length:
            return None
        return out, min(len(head) + prompt_len, len(out))

    def _end_at_read_token(self, ids: list[int]) -> list[int]:
        """`ids` without the trailing ids the rule does not read (`RewardRule.skip_id`): they end at the
        token the framework reads. At least one id is always kept."""
        skip = self.rule.skip_id
        if skip is None:
            return ids
        end = len(ids)
        while end > 1 and ids[end - 1] == skip:
            end -= 1
        return ids[:end]

    # -- templated text -----------------------------------------------------------------------------
    def _starts_templated(self, text: str) -> bool:
        """True when `text` begins (pads, bos and whitespace aside) like the template's conversations: its
        preamble, a system turn or a user turn. A prompt string that only mentions a marker later on is
        plain text (one user turn), so a question about ChatML can still be asked."""
        m = self.markers
        if m is None:
            return False
        skip = [*self._pads, self.tokenizer.bos_token or ""]
        core = _lstrip_any(text.strip(), skip)
        starts = [_lstrip_any(x, skip).strip() for x in (m.open_user, m.open_system or "", m.preamble)]
        return any(x and core.startswith(x) for x in starts)

    def _is_templated(self, text: str) -> bool:
        m = self.markers
        return m is not None and (m.open_user in text or m.open_assistant in text)

    def _strip_text(self, text: str) -> str:
        """Text without the pad/eos tokens and whitespace on either side (and the answer's own end-of-turn)."""
        ends = list(self._pads)
        if self.markers and self.markers.close_assistant:
            ends.append(self.markers.close_assistant)
        return _rstrip_any(_lstrip_any(text, self._pads), ends)

    def _parse_prompt(self, text: str, param: str) -> list[Message]:
        """Messages of a templated prompt (optionally ending with the assistant marker)."""
        m = self.markers
        assert m is not None
        body = text.strip()
        if body.endswith(m.open_assistant):
            body = body[: -len(m.open_assistant)]
        turns = list(
            re.finditer("|".join(re.escape(x) for x in sorted({m.open_user, m.open_assistant}, key=len)[::-1]), body)
        )
        preamble = body[: turns[0].start()] if turns else body
        messages: list[Message] = []
        core = _lstrip_any(preamble, [*self._pads, self.tokenizer.bos_token or ""])
        if core and core != _lstrip_any(m.preamble, [*self._pads, self.tokenizer.bos_token or ""]):
            open_s = _lstrip_any(m.open_system or "", [*self._pads, self.tokenizer.bos_token or ""])
            if not (m.open_system and open_s and core.startswith(open_s)):
                raise FormattingError(
                    f"{param} does not start like the chat template's conversations (found {preamble[:40]!r}); "
                    "send a list of messages instead",
                    param,
                )
            content = _rstrip_any(core[len(open_s) :], [m.close_system or ""])
            messages.append({"role": "system", "content": content.strip()})
        for i, t in enumerate(turns):
            end = turns[i + 1].start() if i + 1 < len(turns) else len(body)
            role = "user" if t.group() == m.open_user else "assistant"
            close = m.close_user if role == "user" else m.close_assistant
            messages.append({"role": role, "content": _rstrip_any(body[t.end() : end], [close]).strip()})
        return normalize_prompt(messages, param)

    def _split_text(self, text: str, prompt: str | None, param: str) -> tuple[list[Message], str] | None:
        """(messages, answer) of templated or HH-transcript text; None for plain text."""
        text = self._strip_text(text)
        if prompt is not None and self.markers is not None:
            p = _rstrip_any(_lstrip_any(check_text(prompt, "prompt"), self._pads), self._pads, whitespace=False)
            if p.strip() and text.startswith(p):
                return self._parse_prompt(p, param), text[len(p) :].strip()
            log.debug("%s: the prompt given is not a prefix of the text; splitting at the last assistant marker", param)
        if self.markers is not None and self.markers.open_assistant in text:
            # The answer starts at the first assistant marker after the last user marker.
            cut = text.find(self.markers.open_assistant, max(0, text.rfind(self.markers.open_user)))
            if cut >= 0:
                cut += len(self.markers.open_assistant)
                return self._parse_prompt(text[:cut], param), text[cut:].strip()
        if self.markers is None or not self._is_templated(text):
            hh = text if text.startswith("\n\n") else "\n\n" + text
            cut = hh.rfind(_HH_ASSISTANT)
            if cut > 0 and "\n\nHuman:" in hh[:cut]:
                try:
                    messages = normalize_prompt(parse_hh_transcript(hh[:cut]), param)
                except FormattingError:
                    return None
                return messages, hh[cut + len(_HH_ASSISTANT) :].strip()
            return None
        raise FormattingError(
            f"{param} has the chat template's user marker but no assistant turn to score; "
            "send the templated prompt followed by the answer",
            param,
        )

    def parse_templated(self, text: str, prompt: str | None = None) -> tuple[list[Message], str]:
        """(messages, answer) of already-templated text, such that `encode_text(text) == encode(messages, answer)`.

        `prompt`, the templated prompt alone, fixes where the answer starts when it is a prefix of the
        text (leading pads aside). Text with neither the template's markers nor HH turns raises.
        """
        check_text(text, "text")
        split = self._split_text(text, prompt, "text")
        if split is None:
            raise FormattingError("text has neither the chat template's markers nor HH turns", "text")
        return split

    def encode_text(
        self, text: str, param: str = "query", prompt: str | None = None, truncation: Truncation | None = None
    ) -> Encoded:
        """Already-templated text (a `/get_reward` query), through `parse_templated` and `encode`.

        Plain text (neither template markers nor HH turns) is scored as its stripped content closed
        by one end-of-turn token.
        """
        check_text(text, param)
        if prompt is not None:
            check_text(prompt, f"{param}.prompt")
        split = self._split_text(text, prompt, param)
        if split is not None:
            messages, answer = split
            return self._encode_messages(messages, answer.strip(), param, param, truncation or self.truncation)
        content = self._strip_text(text).strip()
        if not content:
            raise FormattingError(f"{param} is empty after removing pad tokens and whitespace; give text", param)
        head, tail = self._around
        eot = (self._piece_ids(self.eot_token) if self.eot_token else []) + tail
        ids = self._content_ids(content)
        if len(head) + len(ids) + len(eot) <= self.max_length:
            return Encoded(self._end_at_read_token(head + ids + eot), 0, False)
        if (truncation or self.truncation) == "error":
            partial = len(content) > self.max_length * _WINDOW_CHARS_PER_TOKEN
            raise TooLongError(
                f"{param} is {'at least ' if partial else ''}{len(ids) + len(eot):,} tokens; "
                f"max_length is {self.max_length:,} and truncation='error' was asked",
                param,
                len(ids) + len(eot),
                self.max_length,
            )
        keep = max(0, self.max_length - len(head) - len(eot))
        return Encoded(self._end_at_read_token(head + ids[len(ids) - keep :] + eot), 0, True)

    def describe(self) -> dict[str, Any]:
        return {
            "chat_template": self.has_template,
            "max_length": self.max_length,
            "truncation": self.truncation,
            "end_of_turn": self.eot_token,
            "question_share": QUESTION_SHARE,
            "rule": self.rule.to_dict(),
        }


CLOSING_MARK = "{#- rmserve: a conversation that ends with an assistant turn ends at its end-of-turn token -#}"


_WRAP_OPEN = "{% set _rmserve_rendered %}"
_WRAP_CLOSE = "{% endset %}"


def unwrap_template(template: str) -> str | None:
    """The original template inside one that `closing_template` wrapped; None for any other template."""
    if not template.startswith(CLOSING_MARK + _WRAP_OPEN) or _WRAP_CLOSE not in template:
        return None
    return template[len(CLOSING_MARK + _WRAP_OPEN) : template.rindex(_WRAP_CLOSE)]


def closing_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template, wrapped so that a conversation ending with an assistant turn (no
    generation prompt) renders up to and including the end-of-turn token that closes the answer and
    nothing after it; every other rendering is unchanged. None when no wrapping is needed or possible
    (no template, no eos, the template already ends there, or it is already wrapped), or when the wrapped
    template fails the check below (a WARNING says so).

    Why: rmserve's rule reads the reward at that token ("end_of_turn"). Templates add text after it
    (ChatML's newline), and TRL's reward trainer, reward-bench and vLLM's pooling runner all score
    `apply_chat_template(conversation + [answer])` at its last (non-pad) token. With this template in a
    saved directory their text ends exactly at rmserve's read token, so they give rmserve's reward.

    Check: on probe conversations the wrapped template renders exactly as the original (with and without
    the generation prompt, ending with a user turn), and a conversation ending with an assistant turn
    renders as the original cut after the answer's end-of-turn token."""
    template = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token
    if not isinstance(template, str) or not template or not eos or CLOSING_MARK in template:
        return None
    s = _SENTINEL.format
    conv = [{"role": "user", "content": s(0)}, {"role": "assistant", "content": s(1)}]

    def render(t: str, messages: list[dict[str, str]], gen: bool = False) -> str:
        return str(tokenizer.apply_chat_template(messages, chat_template=t, tokenize=False, add_generation_prompt=gen))

    try:
        full = render(template, conv)
    except Exception as e:  # a template that refuses the probe: leave it as it is
        log.warning("chat template not wrapped: it refused a probe conversation (%s)", e)
        return None
    at = full.rfind(s(1))
    if at < 0:
        return None
    tail = full[at + len(s(1)) :]
    cut = tail[: tail.find(eos) + len(eos)] if eos in tail else tail + eos
    if cut == tail:
        return None
    lit = json.dumps  # a Jinja string literal (JSON's escapes are Jinja's)
    wrapped = (
        CLOSING_MARK
        + _WRAP_OPEN
        + template
        + _WRAP_CLOSE
        + "{%- if messages and messages[-1]['role'] == 'assistant' and not add_generation_prompt and "
        + f"_rmserve_rendered.endswith({lit(tail)}) -%}}"
        + f"{{{{ _rmserve_rendered[:(_rmserve_rendered|length) - {len(tail)}] ~ {lit(cut)} }}}}"
        + "{%- else -%}{{ _rmserve_rendered }}{%- endif -%}"
    )
    probes = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
    ]
    try:
        same = all(render(wrapped, m, g) == render(template, m, g) for m in probes for g in (False, True))
        for m in probes:
            answered = [*m, {"role": "assistant", "content": "Fine."}]
            want = render(template, answered)
            same = same and want.endswith(tail) and render(wrapped, answered) == want[: len(want) - len(tail)] + cut
    except Exception as e:
        log.warning("chat template not wrapped: the wrapped template failed to render (%s)", e)
        return None
    if not same:
        log.warning("chat template not wrapped: the wrapped template did not render as the original does")
        return None
    return wrapped


def _lstrip_any(text: str, tokens: Sequence[str], whitespace: bool = True) -> str:
    """`text` without any run of `tokens` (and whitespace) at its start."""
    tokens = [t for t in tokens if t]
    while True:
        before = text
        if whitespace:
            text = text.lstrip()
        for t in tokens:
            while text.startswith(t):
                text = text[len(t) :]
        if text == before:
            return text


def _rstrip_any(text: str, tokens: Sequence[str], whitespace: bool = True) -> str:
    """`text` without any run of `tokens` (and whitespace) at its end."""
    tokens = [t for t in tokens if t]
    while True:
        before = text
        if whitespace:
            text = text.rstrip()
        for t in tokens:
            while text.endswith(t):
                text = text[: -len(t)]
        if text == before:
            return text


def _whole_encoder(
    tokenizer: Any,
) -> tuple[Callable[[str], tuple[list[int], list[tuple[int, int]]]] | None, dict[int, str]]:
    """(text -> (ids, character offsets) with added tokens matched, as apply_chat_template tokenizes;
    {id: string} of the tokenizer's added and special tokens, whose strings typed into content stay text).
    (None, {}) for a slow tokenizer (no offsets): its ids are always built piecewise. An id such as <unk>
    that the model gives to ordinary characters is not a typed control token: only its literal string is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, {}
    from tokenizers import Tokenizer

    whole = Tokenizer.from_str(backend.to_str())
    whole.no_truncation()
    whole.no_padding()
    control = {int(i): str(getattr(t, "content", t)) for i, t in backend.get_added_tokens_decoder().items()}
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        if i is not None and int(i) not in control:
            control[int(i)] = str(tokenizer.convert_ids_to_tokens(int(i)))

    def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = whole.encode(text, add_special_tokens=False)
        return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]

    return encode, control


def _special_ids_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(ids before, ids after) that `tokenizer(text)` adds around plain text with its default
    `add_special_tokens=True` (its post-processor: a BOS, an EOS), found by tokenizing a probe both ways.
    ([], []) when it adds none, or when the probe's own ids are not found inside (logged)."""
    probe = "Hello world"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    log.warning("could not tell which special tokens the tokenizer adds to plain text: none are added")
    return [], []


def _encoders(tokenizer: Any) -> tuple[Callable[[str], list[int]], Callable[[str], list[int]]]:
    """(template text -> ids, content text -> ids): the second never matches special or added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return (
            lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"]),
            lambda s: list(tokenizer(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]),
        )
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    template = Tokenizer.from_str(json.dumps(spec))
    for added in spec.get("added_tokens") or []:
        added["special"] = True  # added tokens that are not "special" would still be matched in content
    content = Tokenizer.from_str(json.dumps(spec))
    content.encode_special_tokens = True
    for t in (template, content):
        t.no_truncation()
        t.no_padding()
    return (
        lambda s: template.encode(s, add_special_tokens=False).ids,
        lambda s: content.encode(s, add_special_tokens=False).ids,
    )
