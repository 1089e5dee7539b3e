"""Request and response bodies and the error body; nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


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


def prompt_value(prompt: Prompt) -> str | list[dict[str, str]]:
    return prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt]


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
    prompt: Prompt | None = None
    responses: list[str] | None = None
    items: list[ScoreItem] | None = None
    normalize: bool = Field(False, description="z-score with the training-set mean/std stored in the model")

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreRequest:
        if self.items is not None:
            if self.prompt is not None or self.responses is not None:
                raise ValueError("give either 'items' or 'prompt' with 'responses', not both")
        elif self.prompt is None or self.responses is None:
            raise ValueError("give 'prompt' and 'responses', or 'items'")
        return self

    def jobs(self) -> tuple[list[Job], str]:
        """(jobs, the name of the list they came from)."""
        if self.items is not None:
            return [
                Job(prompt_value(it.prompt), it.response, f"items[{i}].response", f"items[{i}].prompt")
                for i, it in enumerate(self.items)
            ], "items"
        assert self.prompt is not None and self.responses is not None
        p = prompt_value(self.prompt)
        return [Job(p, r, f"responses[{i}]") for i, r in enumerate(self.responses)], "responses"


class Usage(BaseModel):
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    scores: list[float]
    truncated: list[bool]
    usage: Usage


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Prompt
    responses: list[str]
    top_n: int | None = Field(None, ge=1, description="return only the best N")
    temperature: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="softmax temperature")
    return_pairwise: bool = Field(False, description="also return P(i better than j) = sigmoid(r_i - r_j)")
    normalize: bool = False

    def jobs(self) -> tuple[list[Job], str]:
        p = prompt_value(self.prompt)
        return [Job(p, r, f"responses[{i}]") for i, r in enumerate(self.responses)], "responses"


class Ranked(BaseModel):
    index: int
    score: float
    probability: float


class RankResponse(BaseModel):
    model: str
    ranking: list[Ranked]
    pairwise: list[list[float]] | None = None
    usage: Usage


class RerankDocument(BaseModel):
    text: str


class RerankRequest(BaseModel):
    """The rerank shape Cohere, Jina and vLLM clients speak."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def jobs(self) -> tuple[list[Job], str]:
        return [Job(self.query, t, f"documents[{i}]", "query") for i, t in enumerate(self.texts())], "documents"


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward model payload: `query` is full prompt+response text, already templated."""

    model_config = ConfigDict(extra="allow")
    query: list[str]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None

    def jobs(self) -> tuple[list[Job], str]:
        return [Job(None, q, f"query[{i}]") for i, q in enumerate(self.query)], "query"


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    backbone: str
    parameters: int
    max_length: int
    dtype: str
    runtime: str
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
