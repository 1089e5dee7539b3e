"""Request and response bodies and the error body, and the one step every route takes from its body:
`jobs()`, the (prompt, answer) pairs to score as `Job`s."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.client import render_tool_calls


def invalid(param: str, message: str) -> PydanticCustomError:
    """A check over several fields, failed: the error names `param` (validation_error reads it from ctx)."""
    return PydanticCustomError("invalid_fields", "{message}", {"message": message, "param": param})


MODEL_FIELD = Field(None, description="accepted from clients that always send it; answers name the served model")


class TextPart(BaseModel):
    """One part of list-of-parts (multimodal) content; only text parts can be scored."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message. `content` is a string or a list of text parts (joined without a separator); the key
    is required (a 422 names a missing one) and a user message's may not be null (a system, tool or
    assistant message's null is empty text). An assistant message may carry `tool_calls` (OpenAI's
    shape), with `content` null or left out, and its calls are scored as text after its content, rendered as the
    TRL adapter renders them (`<tool_call>{"name", "arguments"}</tool_call>`). The `tool` role is accepted
    where the model's chat template has one (else a 422 names the message)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_optional(cls, data: Any) -> Any:
        """Only an assistant message may leave `content` out (OpenAI: with tool calls); it is then null."""
        if isinstance(data, dict) and data.get("role") == "assistant" and "content" not in data:
            return {**data, "content": None}
        return data

    @field_validator("content")
    @classmethod
    def _user_content_not_null(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None and info.data.get("role") == "user":
            raise PydanticCustomError("content_null", "is null; a user message needs text")
        return v

    @field_validator("tool_calls")
    @classmethod
    def _calls_only_for_assistant(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and info.data.get("role") != "assistant":
            raise PydanticCustomError("tool_calls_role", "only an assistant message may carry tool calls")
        return v

    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "".join(p.text for p in self.content)
        calls = render_tool_calls(self.tool_calls) if self.tool_calls else ""
        return "\n".join(t for t in (text, calls) if t)


Prompt = str | list[Message]


@dataclass(frozen=True)
class Job:
    """One sequence to score, as every route reduces its body: a prompt (a string or a list of message
    dicts; None when `response` is one already-templated text) and the answer, with the request fields
    that errors name."""

    prompt: str | list[dict[str, str]] | None
    response: str
    param: str
    prompt_param: str = "prompt"
    truncation: Literal["left", "error"] | None = None  # None: the model's own rule
    hint: str | None = None  # templated text only: the templated prompt it starts with (OpenRLHF's `prompts`)
    keep_tokens: int | None = None  # vLLM's truncate_prompt_tokens: keep this many tokens of the sequence
    keep_side: Literal["left", "right"] = "left"  # vLLM's truncation_side: "left" keeps the last tokens
    answer_tokens: int | None = None  # max_tokens_per_doc: the answer cut to its first N tokens first


TRUNCATION_FIELD: Any = Field(
    None,
    description="what to do when a sequence is longer than the model's max length: 'left' (the default) cuts "
    "the oldest turns, then the start of the final question and of the answer, keeping the answer's end; "
    "'error' answers 413 naming the input instead",
)


TRUNCATE_PROMPT_TOKENS: Any = Field(
    None,
    ge=-1,
    description="vLLM's option: keep only the last N tokens of each (prompt, answer) sequence (the first N with "
    "truncation_side 'right'), reported as truncated; -1 or unset: the model's max length and its own rule; "
    "more than the max length is a 422",
)
TRUNCATION_SIDE: Any = Field(None, description="vLLM's option with truncate_prompt_tokens: 'left' (default) or 'right'")
MAX_TOKENS_PER_DOC: Any = Field(
    None,
    ge=0,
    description="Cohere's (and vLLM's) option: each document cut to its first N tokens before scoring, reported as "
    "truncated; 0 or unset: no cut of its own",
)


def dialect_cuts(
    jobs: list[Job], keep: int | None, side: Literal["left", "right"] | None, per_doc: int | None
) -> list[Job]:
    """Jobs with vLLM's truncate_prompt_tokens / truncation_side and max_tokens_per_doc applied as fields."""
    keep_tokens = keep if keep is not None and keep >= 0 else None  # -1: the model's max length
    answer_tokens = per_doc or None  # 0: no cut
    if keep_tokens is None and answer_tokens is None:
        return jobs
    return [replace(j, keep_tokens=keep_tokens, keep_side=side or "left", answer_tokens=answer_tokens) for j in jobs]


def not_supported(name: str, why: str) -> PydanticCustomError:
    return PydanticCustomError("not_supported", "{name} is not supported: {why}", {"name": name, "why": why})


def tei_truncation(truncate: bool | None) -> Literal["left", "error"] | None:
    """TEI's `truncate` flag: true cuts, false refuses an over-long input (413), unset keeps the model's rule."""
    return None if truncate is None else ("left" if truncate else "error")


def with_truncation(jobs: list[Job], truncation: Literal["left", "error"] | None) -> list[Job]:
    return [replace(j, truncation=truncation) for j in jobs] if truncation else jobs


def prompt_value(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt as the formatter takes it: a string, or messages whose content is plain text."""
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.text()} for m in prompt]


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Prompt
    response: str


class ScoreRequest(BaseModel):
    """Either one prompt with several responses, or `items` with a prompt each."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "How do I boil an egg?", "responses": ["Boil it 8 minutes.", "No idea."]}]
        },
    )
    model: str | None = MODEL_FIELD
    prompt: Prompt | None = None
    responses: list[str] | None = None
    items: list[ScoreItem] | None = None
    normalize: StrictBool = Field(False, description="z-score with the training-set mean/std stored in the model")

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreRequest:
        if self.items is not None:
            if self.prompt is not None or self.responses is not None:
                raise invalid("items", "give either 'items' or 'prompt' with 'responses', not both")
        elif self.prompt is None or self.responses is None:
            raise invalid("prompt" if self.prompt is None else "responses", "give 'prompt' and 'responses', or 'items'")
        return self

    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    def jobs(self) -> tuple[list[Job], str]:
        """(jobs, the name of the list they came from)."""
        if self.items is not None:
            items = [
                Job(prompt_value(it.prompt), it.response, f"items[{i}].response", f"items[{i}].prompt")
                for i, it in enumerate(self.items)
            ]
            return with_truncation(items, self.truncation), "items"
        assert self.prompt is not None and self.responses is not None
        p = prompt_value(self.prompt)
        jobs = [Job(p, r, f"responses[{i}]") for i, r in enumerate(self.responses)]
        return with_truncation(jobs, self.truncation), "responses"


class Usage(BaseModel):
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    scores: list[float]
    truncated: list[bool]
    usage: Usage


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = MODEL_FIELD
    prompt: Prompt
    responses: list[str]
    top_n: StrictInt | None = Field(None, ge=0, description="return only the best N; 0 or unset: all")
    temperature: StrictFloat = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="softmax temperature")
    return_pairwise: StrictBool = Field(False, description="also return P(i better than j) = sigmoid(r_i - r_j)")
    normalize: StrictBool = False

    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    def jobs(self) -> tuple[list[Job], str]:
        p = prompt_value(self.prompt)
        jobs = [Job(p, r, f"responses[{i}]") for i, r in enumerate(self.responses)]
        return with_truncation(jobs, self.truncation), "responses"


class Ranked(BaseModel):
    index: int
    score: float
    probability: float
    truncated: bool = Field(False, description="this response's sequence was cut to the model's max length")


class RankResponse(BaseModel):
    model: str
    ranking: list[Ranked]
    pairwise: list[list[float]] | None = None
    usage: Usage


ACTIVATION_FIELD = Field(
    None,
    description="false/unset: relevance_score is the raw reward; true: sigmoid(reward), in (0, 1) "
    "(vLLM's field name; any rerank or score client may send it)",
)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


def field_text(value: Any) -> str:
    """A structured document's field value as text: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class RerankRequest(BaseModel):
    """The rerank shape Cohere (v1 and v2), Jina and vLLM clients speak: `query` is the prompt, each
    document a candidate answer. A document is a string, or an object scored by its `text` field, or with
    `rank_fields` (Cohere v1) by those fields as `key: value` lines in rank_fields order (the YAML form
    Cohere recommends for structured documents). vLLM's truncate_prompt_tokens / truncation_side and
    Cohere's max_tokens_per_doc are honoured; max_chunks_per_doc (Cohere v1 chunking) and
    max_tokens_per_query (vLLM) are refused with a 422 rather than ignored. Other fields of those APIs
    that do not change a score (priority, user, ...) are accepted and ignored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"query": "How do I boil an egg?", "documents": ["Boil it.", "No idea."]}]},
    )
    model: str | None = MODEL_FIELD
    query: str
    documents: list[str | dict[str, Any]]
    rank_fields: list[str] | None = Field(
        None, min_length=1, description="Cohere v1: the fields of object documents to score, in this order"
    )
    top_n: StrictInt | None = Field(
        None, ge=0, description="return only the best N; 0 or unset: all (vLLM's convention)"
    )
    return_documents: StrictBool = True
    use_activation: StrictBool | None = ACTIVATION_FIELD
    truncate_prompt_tokens: StrictInt | None = TRUNCATE_PROMPT_TOKENS
    truncation_side: Literal["left", "right"] | None = TRUNCATION_SIDE
    max_tokens_per_doc: StrictInt | None = MAX_TOKENS_PER_DOC
    max_chunks_per_doc: Any = Field(None, description="Cohere v1's chunking: refused (a 422) when set")
    max_tokens_per_query: Any = Field(None, description="vLLM's query cut: refused (a 422) when set above 0")
    _texts: list[str] = PrivateAttr(default_factory=list)

    @field_validator("max_chunks_per_doc")
    @classmethod
    def _no_chunks(cls, v: Any) -> Any:
        if v is not None:
            raise not_supported(
                "max_chunks_per_doc",
                "a document longer than the model's max length is truncated, not scored in chunks; leave it unset "
                "(send truncation: 'error' to be told instead)",
            )
        return v

    @field_validator("max_tokens_per_query")
    @classmethod
    def _no_query_cut(cls, v: Any) -> Any:
        if v not in (None, 0):
            raise not_supported(
                "max_tokens_per_query", "the query is the prompt and is cut by the model's own rule; leave it unset"
            )
        return v

    @model_validator(mode="after")
    def _documents_have_text(self) -> RerankRequest:
        self._texts = [self._text(i, d) for i, d in enumerate(self.documents)]
        return self

    def _text(self, i: int, doc: str | dict[str, Any]) -> str:
        if isinstance(doc, str):
            return doc
        if self.rank_fields is None:
            if not isinstance(doc.get("text"), str):
                raise invalid(f"documents[{i}].text", "an object document needs a string 'text', or give rank_fields")
            return str(doc["text"])
        missing = [f for f in self.rank_fields if f not in doc]
        if missing:
            raise invalid(f"documents[{i}].{missing[0]}", f"has no field {missing[0]!r}, which rank_fields names")
        return "\n".join(f"{f}: {field_text(doc[f])}" for f in self.rank_fields)

    def texts(self) -> list[str]:
        """Each document's scored text (validated: strings, `text` fields or rank_fields lines)."""
        return list(self._texts)

    def returned(self, i: int) -> dict[str, Any]:
        """Document i as answers return it: {"text": ...} for a string, the object as given otherwise."""
        doc = self.documents[i]
        return {"text": doc} if isinstance(doc, str) else doc

    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    def jobs(self) -> tuple[list[Job], str]:
        jobs = [Job(self.query, t, f"documents[{i}]", "query") for i, t in enumerate(self.texts())]
        jobs = dialect_cuts(jobs, self.truncate_prompt_tokens, self.truncation_side, self.max_tokens_per_doc)
        return with_truncation(jobs, self.truncation), "documents"


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = Field(
        None, description="the document as sent: {'text': ...} for a string, the object for a structured one"
    )
    truncated: bool = Field(
        False, description="this document's sequence was cut (the model's max length, or an option asking for a cut)"
    )


class RerankUsage(BaseModel):
    """vLLM and Jina read prompt_tokens/total_tokens."""

    prompt_tokens: int
    total_tokens: int


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int
    input_tokens: int


class MetaTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class RerankMeta(BaseModel):
    """Cohere's `meta` (the SDK's ApiMeta): one search unit per request, the tokens scored."""

    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens


class RerankResponse(BaseModel):
    """One answer every rerank client parses: Cohere v1/v2 (id, results, meta), Jina and vLLM (id,
    model, results with document, usage)."""

    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    meta: RerankMeta


class TEIRerankRequest(BaseModel):
    """Hugging Face text-embeddings-inference's rerank body."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = MODEL_FIELD
    query: str
    texts: list[str]
    raw_scores: StrictBool = Field(False, description="true: the raw reward; false (TEI's default): sigmoid(reward)")
    return_text: StrictBool = False
    truncate: StrictBool | None = Field(
        None, description="true: cut over-long inputs (keeping the answer's end); false: 413 instead; unset: cut"
    )
    truncation_direction: str | None = Field(None, description="accepted and ignored")
    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    def jobs(self) -> tuple[list[Job], str]:
        jobs = [Job(self.query, t, f"texts[{i}]", "query") for i, t in enumerate(self.texts)]
        return with_truncation(jobs, self.truncation or tei_truncation(self.truncate)), "texts"


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None
    truncated: bool = Field(False, description="this text's sequence was cut to the model's max length")


def _rerank_kind(body: Any) -> str:
    return (
        "TEIRerankRequest"
        if isinstance(body, dict) and "texts" in body and "documents" not in body
        else "RerankRequest"
    )


AnyRerankRequest = Annotated[
    Annotated[RerankRequest, Tag("RerankRequest")] | Annotated[TEIRerankRequest, Tag("TEIRerankRequest")],
    Discriminator(_rerank_kind),
]


class TEIPredictRequest(BaseModel):
    """TEI's /predict: a text, a [text, text_pair] pair, or a batch of [text] / [text, text_pair] lists.
    A single text is scored as already-templated text (like /get_reward); a pair as (prompt, answer)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = MODEL_FIELD
    inputs: str | list[str] | list[list[str]]
    raw_scores: StrictBool = Field(False, description="true: the raw reward; false (TEI's default): sigmoid(reward)")
    truncate: StrictBool | None = Field(
        None, description="true: cut over-long inputs (keeping the answer's end); false: 413 instead; unset: cut"
    )
    truncation_direction: str | None = None
    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    @property
    def batched(self) -> bool:
        return isinstance(self.inputs, list) and bool(self.inputs) and isinstance(self.inputs[0], list)

    def sequences(self) -> list[tuple[list[str], str]]:
        """Each input as ([text] or [text, text_pair], its field name)."""
        if isinstance(self.inputs, str):
            return [([self.inputs], "inputs")]
        if not self.batched:
            return [(list(self.inputs), "inputs")]  # type: ignore[arg-type]
        return [(list(seq), f"inputs[{i}]") for i, seq in enumerate(self.inputs)]  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _texts_or_pairs(self) -> TEIPredictRequest:
        for seq, param in self.sequences():
            if len(seq) not in (1, 2):
                raise invalid(
                    param,
                    f"{param} has {len(seq)} strings; give a text, [text] or a pair [text, text_pair] (TEI's /predict)",
                )
        return self

    def jobs(self) -> tuple[list[Job], str]:
        jobs = [
            Job(None, seq[0], param) if len(seq) == 1 else Job(seq[0], seq[1], f"{param}[1]", f"{param}[0]")
            for seq, param in self.sequences()
        ]
        return with_truncation(jobs, self.truncation or tei_truncation(self.truncate)), "inputs"


class TEIPrediction(BaseModel):
    score: float
    label: str
    truncated: bool = Field(False, description="this input's sequence was cut to the model's max length")


ScoreInputs = str | list[str]


class VLLMScoreRequest(BaseModel):
    """vLLM's score body: `text_1`/`text_2` (or `data_1`/`data_2`, `queries`/`documents`,
    `queries`/`items`). One first text is paired with every second text; otherwise they pair up 1:1.
    The first text is the prompt, the second the answer scored."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"text_1": "How do I boil an egg?", "text_2": ["Boil it.", "No idea."]}]},
    )
    model: str | None = MODEL_FIELD
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    use_activation: StrictBool | None = ACTIVATION_FIELD
    truncate_prompt_tokens: StrictInt | None = TRUNCATE_PROMPT_TOKENS
    truncation_side: Literal["left", "right"] | None = TRUNCATION_SIDE
    max_tokens_per_doc: StrictInt | None = MAX_TOKENS_PER_DOC
    max_tokens_per_query: Any = Field(None, description="vLLM's query cut: refused (a 422) when set above 0")

    @field_validator("max_tokens_per_query")
    @classmethod
    def _no_query_cut(cls, v: Any) -> Any:
        if v not in (None, 0):
            raise not_supported(
                "max_tokens_per_query",
                "the first text is the prompt and is cut by the model's own rule; leave it unset",
            )
        return v

    @model_validator(mode="after")
    def _one_pair(self) -> VLLMScoreRequest:
        given = [p for p in VLLM_PAIRS if any(getattr(self, n) is not None for n in p)]
        complete = [p for p in given if all(getattr(self, n) is not None for n in p)]
        if len(complete) != 1:
            # name the half-given pair's missing field, else the first pair's
            lone = [n for p in given if p not in complete for n in p if getattr(self, n) is None]
            raise invalid(
                lone[0] if lone and not complete else (complete[1][0] if len(complete) > 1 else "text_1"),
                "give exactly one pair of fields: text_1/text_2, data_1/data_2, queries/documents or queries/items",
            )
        n1, n2 = complete[0]
        a, b = self._lists()
        if not a or not b:
            raise invalid(n1 if not a else n2, f"'{n1 if not a else n2}' is empty; give at least one text")
        if len(a) != 1 and len(a) != len(b):
            raise invalid(
                n1, f"'{n1}' has {len(a)} texts and '{n2}' has {len(b)}; give one '{n1}' or as many as '{n2}'"
            )
        return self

    def names(self) -> tuple[str, str]:
        for first, second in VLLM_PAIRS:
            if getattr(self, first) is not None and getattr(self, second) is not None:
                return first, second
        raise AssertionError("validated: one pair is given")

    def _lists(self) -> tuple[list[str], list[str]]:
        v1, v2 = (getattr(self, n) for n in self.names())
        return ([v1] if isinstance(v1, str) else list(v1)), ([v2] if isinstance(v2, str) else list(v2))

    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    def jobs(self) -> tuple[list[Job], str]:
        (n1, n2), (a, b) = self.names(), self._lists()
        single1, single2 = isinstance(getattr(self, n1), str), isinstance(getattr(self, n2), str)
        p1 = [n1] if single1 else [f"{n1}[{i}]" for i in range(len(a))]
        p2 = [n2] if single2 else [f"{n2}[{j}]" for j in range(len(b))]
        if len(a) == 1:
            jobs = [Job(a[0], t, p2[j], p1[0]) for j, t in enumerate(b)]
        else:
            jobs = [Job(a[i], b[i], p2[i], p1[i]) for i in range(len(a))]
        jobs = dialect_cuts(jobs, self.truncate_prompt_tokens, self.truncation_side, self.max_tokens_per_doc)
        return with_truncation(jobs, self.truncation), n2


VLLM_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
VLLM_SCORE_FIELDS = frozenset(n for pair in VLLM_PAIRS for n in pair) - {"items"}


def _score_kind(body: Any) -> str:
    """vLLM's shape has text_1/data_1/queries/... ; ours has prompt/responses or items."""
    if isinstance(body, dict) and VLLM_SCORE_FIELDS & body.keys():
        return "VLLMScoreRequest"
    return "ScoreRequest"


AnyScoreRequest = Annotated[
    Annotated[ScoreRequest, Tag("ScoreRequest")] | Annotated[VLLMScoreRequest, Tag("VLLMScoreRequest")],
    Discriminator(_score_kind),
]


class VLLMUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class VLLMScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float
    truncated: bool = Field(False, description="this pair's sequence was cut to the model's max length")


class VLLMScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[VLLMScoreData]
    usage: VLLMUsage


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward model payload: `query` is full prompt+response text, already templated."""

    model_config = ConfigDict(extra="allow")
    query: list[str]
    prompts: list[Any] | None = Field(
        None, description="the templated prompt of each query (a prefix of it): fixes where its answer starts"
    )
    labels: list[Any] | None = None
    truncation: Literal["left", "error"] | None = TRUNCATION_FIELD

    @field_validator("prompts")
    @classmethod
    def _one_prompt_per_query(cls, v: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        n = len(info.data.get("query") or [])
        if v is not None and len(v) != n:
            raise ValueError(f"has {len(v)} entries for {n} queries; give one prompt per query, or none")
        return v

    def jobs(self) -> tuple[list[Job], str]:
        hints = self.prompts
        jobs = [
            Job(None, q, f"query[{i}]", hint=h if isinstance(h, str) and h.strip() else None)
            for i, (q, h) in enumerate(zip(self.query, hints or [None] * len(self.query), strict=True))
        ]
        return with_truncation(jobs, self.truncation), "query"


class RewardResponse(BaseModel):
    """`truncated[i]` says query i was cut to the model's max length; `extra_logs.truncated` carries the
    same as 0.0/1.0 per query, which OpenRLHF logs beside the rewards (its mean is the truncation rate)."""

    rewards: list[float]
    scores: list[float]
    truncated: list[bool] = Field(default_factory=list)
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class ScoringMode(BaseModel):
    """How rewards are computed: a reward is reproducible bit for bit only within one mode and CPU kind."""

    name: str  # runtime-forward-dtype, e.g. torch-canonical-float32
    runtime: str
    forward: str  # canonical (packed, batch-invariant by construction) | padded
    dtype: str
    batch_invariant: bool | None  # a reward alone == in any batch, bit for bit (None: not measured)
    cpu: str  # the machine kind the guarantee is for


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    backbone: str
    parameters: int
    max_length: int
    dtype: str
    runtime: str
    mode: ScoringMode | None = None
    normalization: dict[str, float] | None
    training: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo
