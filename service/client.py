"""Python client for rmserve (sync and async), plus a reward-function adapter for TRL trainers.

    from service.client import RewardClient
    rc = RewardClient("http://127.0.0.1:8000", api_key=None, timeout=30)
    rc.score("How do I boil an egg?", ["Boil it 8 minutes.", "No idea."])  # -> [1.9, -0.4]

Every method returns plain Python values. 429 and 503 answers are retried with backoff, honouring
`Retry-After`; other errors raise typed exceptions that carry the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

Prompt = str | Sequence[Mapping[str, str]]


class RewardServiceError(Exception):
    """An error answer from the service: status, and the error body's message, type, param and code."""

    def __init__(
        self, status: int, message: str, type: str | None = None, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(f"{status} {type or 'error'}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class InvalidRequestError(RewardServiceError):
    """400, 413, 422: the request was wrong; the message names the field."""


class AuthenticationError(RewardServiceError):
    """401: missing or wrong API key."""


class RateLimitedError(RewardServiceError):
    """429 after every retry: the service stayed at its admission limit."""


class ServiceUnavailableError(RewardServiceError):
    """503 after every retry: the model is not ready."""


class DeadlineExceededError(RewardServiceError):
    """504: the request passed the server's deadline."""


class ServerError(RewardServiceError):
    """Any other 5xx."""


class ConnectionFailedError(RewardServiceError):
    """The service could not be reached (after retries)."""


RETRY_STATUSES = (429, 503)


def _error_from(response: httpx.Response) -> RewardServiceError:
    try:
        err = response.json()["error"]
        message, kind, param, code = err.get("message", ""), err.get("type"), err.get("param"), err.get("code")
    except Exception:
        message, kind, param, code = response.text[:500], None, None, None
    s = response.status_code
    cls: type[RewardServiceError] = (
        AuthenticationError
        if s == 401
        else RateLimitedError
        if s == 429
        else ServiceUnavailableError
        if s == 503
        else DeadlineExceededError
        if s == 504
        else InvalidRequestError
        if 400 <= s < 500
        else ServerError
    )
    return cls(s, message, kind, param, code)


def _delay(response: httpx.Response | None, attempt: int, backoff: float, max_delay: float) -> float:
    if response is not None:
        ra = response.headers.get("retry-after")
        if ra:
            try:
                return min(max_delay, float(ra))
            except ValueError:
                pass
    return min(max_delay, backoff * 2**attempt * (1 + 0.25 * random.random()))


def _prompt(p: Prompt) -> Any:
    return p if isinstance(p, str) else [dict(m) for m in p]


def _items_payload(items: Sequence[tuple[Prompt, str] | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"prompt": _prompt(it["prompt"]), "response": it["response"]}
        if isinstance(it, Mapping)
        else {"prompt": _prompt(it[0]), "response": it[1]}
        for it in items
    ]


class _Base:
    """What the sync and async clients share: settings, request bodies and the retry decision."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.25,
        max_delay: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.max_retries, self.backoff, self.max_delay = timeout, max_retries, backoff, max_delay
        self.retries = 0  # how many times a request was retried (for monitoring)
        self.limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        self._http = self._make_http()

    def _make_http(self) -> Any:
        raise NotImplementedError

    def _retry_after(self, response: httpx.Response | None, error: Exception | None, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None to stop (raising the typed error)."""
        retryable = error is not None or (response is not None and response.status_code in RETRY_STATUSES)
        if not retryable or attempt >= self.max_retries:
            return None
        self.retries += 1
        return _delay(response, attempt, self.backoff, self.max_delay)

    @staticmethod
    def _result(response: httpx.Response | None, error: Exception | None) -> Any:
        if error is not None:
            raise ConnectionFailedError(0, f"{type(error).__name__}: {error}") from error
        assert response is not None
        if response.status_code >= 400:
            raise _error_from(response)
        return response.json()

    @staticmethod
    def _score_body(prompt: Prompt, responses: Sequence[str], normalize: bool) -> dict[str, Any]:
        return {"prompt": _prompt(prompt), "responses": list(responses), "normalize": normalize}

    @staticmethod
    def _rank_body(prompt: Prompt, responses: Sequence[str], top_n: int | None, temperature: float) -> dict[str, Any]:
        return {"prompt": _prompt(prompt), "responses": list(responses), "top_n": top_n, "temperature": temperature}

    @staticmethod
    def _rerank_body(query: str, documents: Sequence[str], top_n: int | None) -> dict[str, Any]:
        return {"query": query, "documents": list(documents), "top_n": top_n, "return_documents": False}


class RewardClient(_Base):
    """Synchronous client with connection pooling.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        api_key: sent as `Authorization: Bearer KEY` when set.
        timeout: seconds per HTTP attempt.
        max_retries: retries on 429/503 and connection errors.
        backoff: first backoff in seconds (doubles each retry) when the server sends no Retry-After.
    """

    _http: httpx.Client

    def _make_http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout, limits=self.limits)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as e:
                error = e
            wait = self._retry_after(response, error, attempt)
            if wait is None:
                return self._result(response, error)
            time.sleep(wait)
            attempt += 1

    def score(self, prompt: Prompt, responses: Sequence[str], normalize: bool = False) -> list[float]:
        return [
            float(x)
            for x in self._request("POST", "/v1/score", self._score_body(prompt, responses, normalize))["scores"]
        ]

    def score_items(
        self, items: Sequence[tuple[Prompt, str] | Mapping[str, Any]], normalize: bool = False
    ) -> list[float]:
        body = {"items": _items_payload(items), "normalize": normalize}
        return [float(x) for x in self._request("POST", "/v1/score", body)["scores"]]

    def rank(
        self, prompt: Prompt, responses: Sequence[str], top_n: int | None = None, temperature: float = 1.0
    ) -> list[dict[str, Any]]:
        return list(
            self._request("POST", "/v1/rank", self._rank_body(prompt, responses, top_n, temperature))["ranking"]
        )

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> list[dict[str, Any]]:
        return list(self._request("POST", "/v1/rerank", self._rerank_body(query, documents, top_n))["results"])

    def get_reward(self, queries: Sequence[str]) -> list[float]:
        return [float(x) for x in self._request("POST", "/get_reward", {"query": list(queries)})["rewards"]]

    def models(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/models")["data"])

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False


class AsyncRewardClient(_Base):
    """The asyncio twin of RewardClient (same methods, awaitable)."""

    _http: httpx.AsyncClient

    def _make_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout, limits=self.limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, json: Any = None) -> Any:
        attempt = 0
        while True:
            response, error = None, None
            try:
                response = await self._http.request(method, path, json=json)
            except httpx.TransportError as e:
                error = e
            wait = self._retry_after(response, error, attempt)
            if wait is None:
                return self._result(response, error)
            await asyncio.sleep(wait)
            attempt += 1

    async def score(self, prompt: Prompt, responses: Sequence[str], normalize: bool = False) -> list[float]:
        out = await self._request("POST", "/v1/score", self._score_body(prompt, responses, normalize))
        return [float(x) for x in out["scores"]]

    async def score_items(
        self, items: Sequence[tuple[Prompt, str] | Mapping[str, Any]], normalize: bool = False
    ) -> list[float]:
        out = await self._request("POST", "/v1/score", {"items": _items_payload(items), "normalize": normalize})
        return [float(x) for x in out["scores"]]

    async def rank(
        self, prompt: Prompt, responses: Sequence[str], top_n: int | None = None, temperature: float = 1.0
    ) -> list[dict[str, Any]]:
        out = await self._request("POST", "/v1/rank", self._rank_body(prompt, responses, top_n, temperature))
        return list(out["ranking"])

    async def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None) -> list[dict[str, Any]]:
        return list((await self._request("POST", "/v1/rerank", self._rerank_body(query, documents, top_n)))["results"])

    async def get_reward(self, queries: Sequence[str]) -> list[float]:
        return [float(x) for x in (await self._request("POST", "/get_reward", {"query": list(queries)}))["rewards"]]

    async def models(self) -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/models"))["data"])

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False


def content_text(content: Any) -> str:
    """A message's content as text: a string as is, None or missing as "", a list of parts as its text
    parts joined. Raises ValueError for an image or other non-text part, as the server answers 422 for
    one: a reward model that reads text must not score a prompt with part of it silently left out."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for p in content:
            kind = p.get("type", "text") if isinstance(p, Mapping) else "text"
            if kind != "text":
                raise ValueError(f"a content part of type {kind!r} cannot be scored: this reward model reads text only")
            texts.append(str(p.get("text", "")) if isinstance(p, Mapping) else str(p))
        return "".join(texts)
    return str(content)


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]] | None) -> str:
    """Tool calls as text, the Hermes/Qwen convention: one `<tool_call>{"name": ..., "arguments": ...}
    </tool_call>` block per call, JSON arguments parsed when they come as a string."""
    blocks = []
    for call in tool_calls or ():
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            with contextlib.suppress(ValueError):
                args = json.loads(args)
        body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
        blocks.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(blocks)


def message_text(m: Mapping[str, Any]) -> str:
    """An assistant message's text then its rendered tool calls; a tool message's content wrapped in
    `<tool_response>` tags (so a completion's tool results stay in the scored text)."""
    text = content_text(m.get("content"))
    if m.get("role") == "tool":
        return f"<tool_response>\n{text}\n</tool_response>"
    calls = render_tool_calls(m.get("tool_calls"))
    return "\n".join(t for t in (text, calls) if t)


class RewardFunction:
    """A reward function for TRL's GRPO/RLOO trainers: `reward_funcs=[RewardFunction(url)]`.

    Called as TRL calls it, `(prompts, completions, **kwargs) -> list[float]`, with plain strings or
    conversational message lists; scores go to the server in batches of `batch_size` items.

    What is scored for a conversational completion: its assistant and tool messages in order, joined by
    newlines; an assistant message is its text (list-of-parts content: the text parts joined; None or
    missing content: "") followed by its tool calls rendered as `<tool_call>{"name", "arguments"}</tool_call>`;
    a tool message is its content inside `<tool_response>` tags. Prompt messages keep their role (the
    server accepts `tool` where the model's chat template has that role) with content as text; a prompt
    assistant message with tool calls carries them rendered the same way.
    """

    def __init__(
        self, client: RewardClient | str, batch_size: int = 64, normalize: bool = False, name: str = "rmserve"
    ) -> None:
        self.client = RewardClient(client) if isinstance(client, str) else client
        self.batch_size = batch_size
        self.normalize = normalize
        self.__name__ = name  # TRL logs each reward function under its __name__

    @staticmethod
    def _completion_text(c: Any) -> str:
        if isinstance(c, str):
            return c
        if isinstance(c, Mapping):  # one message instead of a list
            c = [c]
        return "\n".join(
            t for m in c if m.get("role", "assistant") in ("assistant", "tool") for t in [message_text(m)] if t
        )

    @staticmethod
    def _prompt(p: Any) -> Prompt:
        if isinstance(p, str):
            return p
        return [
            {"role": m["role"], "content": message_text(m) if m["role"] != "tool" else content_text(m.get("content"))}
            for m in p
        ]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        # An empty completion (a policy can produce one) is scored as the empty answer.
        items = [(self._prompt(p), self._completion_text(c)) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            out.extend(self.client.score_items(items[start : start + self.batch_size], normalize=self.normalize))
        return out
