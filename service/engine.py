"""Admission, formatting/tokenizing, submission to the batcher, and assembling results."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from models.batching import PromptSplit
from models.formatting import Encoded, Formatter, FormattingError, TooLongError
from service.batcher import Batcher, QueueFull, Reservation, Ticket
from service.errors import InferenceFailed, InvalidRequest, Overloaded, PayloadTooLarge
from service.metrics import Metrics
from service.schemas import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_responses: int = 64  # responses / items / queries per request
    max_chars: int = 200_000  # characters per text
    request_timeout_s: float = 60.0
    retry_after_s: int = 1
    admit_wait_fraction: float = 0.7  # admit only when the projected completion is within this of the deadline
    max_reward_queries: int = 4096  # queries per /get_reward call (whole rollout batches)
    max_messages: int = 512  # messages per prompt (a list, or the turns of templated text)


def rollout_deadline(n: int, request_timeout_s: float, max_responses: int) -> float:
    """A rollout batch's deadline: RMSERVE_REQUEST_TIMEOUT_S per started block of RMSERVE_MAX_RESPONSES
    queries (64 queries: 60 s; 1,024: 16 x 60 s), as if the batch came as that many ordinary requests."""
    return request_timeout_s * max(1, math.ceil(n / max_responses))


def rollout_slice(max_batch_size: int, max_queued: int) -> int:
    """Queries per slice fed to the batcher: a few passes' worth, and two slices (the most in flight)
    well under the queue limit, so a whole rollout batch never trips the 429 that guards the queue."""
    return max(1, min(4 * max_batch_size, max_queued // 4))


@dataclass(frozen=True)
class Scored:
    scores: list[float]  # raw rewards, input order
    truncated: list[bool]
    tokens: int


class ScoringEngine:
    """Turns validated requests into scores: checks limits, formats with the model's own formatter
    (the trainer's), submits every sequence to the shared batcher and waits within the deadline."""

    def __init__(
        self,
        formatter: Formatter,
        batcher: Batcher,
        *,
        model_id: str,
        normalization: dict[str, float] | None,
        limits: Limits,
        metrics: Metrics,
        log_texts: bool = False,
        normalize_rollouts: bool = False,
    ) -> None:
        self.formatter = formatter
        # /get_reward answers normalized rewards: an OpenRLHF checkpoint saved with normalize_reward (its
        # serve_rm applies mean/std in the forward then); /v1 routes stay raw unless normalize=true
        self.normalize_rollouts = normalize_rollouts
        self.batcher = batcher
        self.model_id = model_id
        self.normalization = normalization
        self.limits = limits
        self.metrics = metrics
        self.log_texts = log_texts
        self.chars_per_token = 3.0  # learned from what was formatted; cheap cost estimates before formatting
        self._cpt_learned = False

    # -- one step from jobs to scores ------------------------------------------------------------
    async def score(
        self,
        jobs: Sequence[Job],
        count_param: str,
        *,
        max_count: tuple[int, str] | None = None,
        timeout_s: float | None = None,
        slice_size: int | None = None,
    ) -> Scored:
        """Check every limit, format off the event loop, score through the batcher. The deadline never
        ends in a 504: work that will not make it is refused with a counted 429 (at admission, when the
        batcher's re-check after a slower pass projects it past the deadline, or at the deadline if none of
        it has started), and work whose forward pass has started is finished and answered, even late.
        `count_param` names the list the jobs came from (for count errors).
        `max_count` (limit, its setting's name) replaces limits.max_responses, `timeout_s` the deadline;
        with `slice_size`, the jobs go to the batcher in slices, at most two in flight, so other
        requests' work interleaves with a large batch. Admission (429) is decided before formatting."""
        self.check_jobs(jobs, count_param, max_count)
        timeout = timeout_s if timeout_s is not None else self.limits.request_timeout_s
        reservation = self.admit(jobs, timeout, slice_size)
        ticket = Ticket(deadline=time.perf_counter() + timeout)
        task = asyncio.ensure_future(self._encode_and_run(jobs, reservation, slice_size, ticket))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done and not ticket.started:  # never a 504: work that has not started is refused
                task.cancel()
                wait = self.batcher.projected_s(0)
                raise self._overloaded(
                    QueueFull(
                        f"its work had not started within its {timeout:g} s deadline (RMSERVE_REQUEST_TIMEOUT_S)",
                        retry_after_s=wait,
                    )
                )
            return await task  # late but started: a forward pass has begun, so it is finished and answered
        finally:
            if not task.done():  # the caller went away (client gone): its queued work is dropped
                task.cancel()
            reservation.release()

    async def score_rollout(self, jobs: Sequence[Job], count_param: str) -> Scored:
        """`score` for a whole rollout batch (OpenRLHF's /get_reward): up to `max_reward_queries`, a
        deadline that grows with the batch (`rollout_deadline`), fed to the batcher in slices
        (`rollout_slice`) so other clients' requests interleave."""
        lim = self.limits
        return await self.score(
            jobs,
            count_param,
            max_count=(lim.max_reward_queries, "RMSERVE_MAX_REWARD_QUERIES"),
            timeout_s=rollout_deadline(len(jobs), lim.request_timeout_s, lim.max_responses),
            slice_size=rollout_slice(self.batcher.max_batch_size, self.batcher.max_queued),
        )

    async def _encode_and_run(
        self,
        jobs: Sequence[Job],
        reservation: Reservation | None,
        slice_size: int | None = None,
        ticket: Ticket | None = None,
    ) -> Scored:
        if not slice_size or len(jobs) <= slice_size:
            return await self._encode_and_submit(jobs, reservation, ticket)
        in_flight = asyncio.Semaphore(2)

        async def one(part: Sequence[Job]) -> Scored:
            async with in_flight:  # the first slice's submit hands the reservation over to the queue
                return await self._encode_and_submit(part, reservation, ticket)

        tasks = [asyncio.ensure_future(one(jobs[i : i + slice_size])) for i in range(0, len(jobs), slice_size)]
        try:
            parts = await asyncio.gather(*tasks)
        finally:  # one slice failed or the caller went away: the others' queued work is dropped
            for t in tasks:
                t.cancel()
        return Scored(
            [s for p in parts for s in p.scores], [t for p in parts for t in p.truncated], sum(p.tokens for p in parts)
        )

    async def _encode_and_submit(
        self, jobs: Sequence[Job], reservation: Reservation | None, ticket: Ticket | None = None
    ) -> Scored:
        encoded = await asyncio.to_thread(self.encode, jobs)
        self._learn_chars_per_token(jobs, encoded)
        return await self.run(encoded, reservation, ticket)

    # -- admission by projected wait, before any formatting work ----------------------------------
    def refuse_before_body(self, body_bytes: int) -> Overloaded | None:
        """The refusal the edge can make from the headers alone, before reading and parsing the body, so
        that refusing costs no JSON parse: the work ahead plus the body's bytes read as characters (a
        lower bound on the request's tokens: its prompt counts once here, once per answer when scored)
        would not finish within the admission budget. Nothing ahead admits, as in `admit`."""
        tokens = math.floor(body_bytes / max(self.chars_per_token, 1.0))
        refusal = self.batcher.projected_refusal(tokens, self._budget())
        return None if refusal is None else self._overloaded(refusal)

    def _budget(self, timeout_s: float | None = None) -> float:
        """Seconds a request's projected completion may take: `admit_wait_fraction` of its deadline."""
        deadline = timeout_s if timeout_s is not None else self.limits.request_timeout_s
        return deadline * self.limits.admit_wait_fraction

    def _overloaded(self, e: QueueFull) -> Overloaded:
        """The 429 for a refusal of the batcher's, counted, with Retry-After from its projection."""
        self.metrics.failures.labels("overloaded").inc()
        wait = e.retry_after_s
        return Overloaded(
            f"the service is at its admission limit: {e}; retry later",
            retry_after=max(1, math.ceil(wait)) if wait is not None else self.limits.retry_after_s,
        )

    def estimate_tokens(self, jobs: Sequence[Job]) -> int:
        """A cheap token count (characters over the learned characters per token, at most max_length
        per sequence) to decide admission before the full formatting work."""
        cap = self.formatter.max_length
        return sum(min(cap, 8 + math.ceil(_chars(job) / self.chars_per_token)) for job in jobs)

    def admit(self, jobs: Sequence[Job], timeout_s: float | None = None, slice_size: int | None = None) -> Reservation:
        """429 at once when the work ahead (at the measured tokens/s) would not let these jobs finish
        within `admit_wait_fraction` of the deadline, or the queue is at RMSERVE_MAX_QUEUED (jobs sent
        in slices hold at most one slice's place in the queue at admission)."""
        seqs = min(len(jobs), slice_size) if slice_size else len(jobs)
        try:
            return self.batcher.admit(seqs, self.estimate_tokens(jobs), self._budget(timeout_s))
        except QueueFull as e:
            raise self._overloaded(e) from None

    def _learn_chars_per_token(self, jobs: Sequence[Job], encoded: Sequence[Encoded]) -> None:
        pairs = [(_chars(j), len(e.ids)) for j, e in zip(jobs, encoded, strict=True) if not e.truncated]
        chars, tokens = sum(c for c, _ in pairs), sum(t for _, t in pairs)
        if chars and tokens:
            seen = max(0.5, chars / tokens)  # the first observation replaces the prior
            self.chars_per_token = 0.8 * self.chars_per_token + 0.2 * seen if self._cpt_learned else seen
            self._cpt_learned = True

    def check_jobs(self, jobs: Sequence[Job], count_param: str, max_count: tuple[int, str] | None = None) -> None:
        """Every request limit, in one place: the count, and each text's length (each prompt once)."""
        if not jobs:
            raise InvalidRequest(f"'{count_param}' is empty; give at least one", param=count_param)
        limit, setting = max_count or (self.limits.max_responses, "RMSERVE_MAX_RESPONSES")
        if len(jobs) > limit:
            raise PayloadTooLarge(
                f"'{count_param}' has {len(jobs)} entries; at most {limit} are allowed per request ({setting})",
                param=count_param,
                code="too_many_responses",
            )
        keep = jobs[0].keep_tokens
        if keep is not None and not 1 <= keep <= self.formatter.max_length:
            raise InvalidRequest(
                f"truncate_prompt_tokens is {keep}; give 1 to the model's max length ({self.formatter.max_length}), "
                "or -1 for the max length",
                param="truncate_prompt_tokens",
            )
        seen: set[int] = set()
        for job in jobs:
            if job.prompt is not None and id(job.prompt) not in seen:
                seen.add(id(job.prompt))
                self._check_prompt(job.prompt, job.prompt_param)
            if job.prompt is None:  # templated text: its turns are parsed into messages
                self._check_turns(job.response, job.param)
                if job.hint is not None:
                    self._check_turns(job.hint, job.param)
            # An answer may be empty (a policy does produce empty answers, and a PPO step needs their
            # reward): "", " " and "\n" are the same empty answer. Templated text (prompt None) may not.
            self._check_text(job.response, job.param, allow_empty=job.prompt is not None)

    def _check_text(self, text: str, param: str, *, allow_empty: bool = False) -> None:
        if not allow_empty and not text.strip():  # whitespace around text is not content
            raise InvalidRequest(
                f"'{param}' is empty{' (only whitespace)' if text else ''}; give non-empty text",
                param=param,
                code="empty_text",
            )
        if len(text) > self.limits.max_chars:
            raise PayloadTooLarge(
                f"'{param}' has {len(text):,} characters; at most {self.limits.max_chars:,} are allowed "
                "(RMSERVE_MAX_CHARS)",
                param=param,
                code="text_too_long",
            )

    def _check_turns(self, text: str, param: str) -> None:
        """413 when templated (or Human:/Assistant:) text holds more turns than RMSERVE_MAX_MESSAGES: it
        would be parsed into that many messages. Counted with str.count, before any formatting."""
        markers = self.formatter.markers
        turns = text.count("\n\nHuman:") + text.count("\n\nAssistant:")
        if markers is not None:
            opens = {markers.open_user, markers.open_assistant} - {""}
            turns = max(turns, sum(text.count(m) for m in opens))
        if turns > self.limits.max_messages:
            raise PayloadTooLarge(
                f"'{param}' holds {turns:,} conversation turns; at most {self.limits.max_messages:,} messages are "
                "allowed per prompt (RMSERVE_MAX_MESSAGES)",
                param=param,
                code="too_many_messages",
            )

    def _check_prompt(self, prompt: str | Sequence[dict[str, str]], param: str) -> None:
        if isinstance(prompt, str):
            self._check_text(prompt, param)
            self._check_turns(prompt, param)
            return
        if not prompt:
            raise InvalidRequest(f"'{param}' is an empty message list; give at least one message", param=param)
        if len(prompt) > self.limits.max_messages:
            raise PayloadTooLarge(
                f"'{param}' has {len(prompt):,} messages; at most {self.limits.max_messages:,} are allowed per "
                "prompt (RMSERVE_MAX_MESSAGES)",
                param=param,
                code="too_many_messages",
            )
        for i, m in enumerate(prompt):
            self._check_text(m["content"], f"{param}[{i}].content", allow_empty=True)

    def encode(self, jobs: Sequence[Job]) -> list[Encoded]:
        """Jobs -> token ids through the trainer's formatter (blocking: runs on a worker thread)."""
        out = []
        for job in jobs:
            try:
                if job.prompt is None:
                    enc = self.formatter.encode_text(
                        job.response, param=job.param, prompt=job.hint, truncation=job.truncation
                    )
                else:
                    answer, cut = self._first_tokens(job.response, job.answer_tokens)
                    enc = self.formatter.encode(
                        job.prompt,
                        answer,
                        param=job.param,
                        prompt_param=job.prompt_param,
                        truncation=job.truncation,
                    )
                    if cut:
                        enc = replace(enc, truncated=True)
                out.append(keep_tokens(enc, job.keep_tokens, job.keep_side))
            except TooLongError as e:
                raise PayloadTooLarge(str(e), param=e.param or job.param, code="sequence_too_long") from None
            except FormattingError as e:
                raise InvalidRequest(str(e), param=e.param or job.param) from None
        return out

    def _first_tokens(self, text: str, n: int | None) -> tuple[str, bool]:
        """`text` cut to its first `n` tokens (Cohere's max_tokens_per_doc), at a token boundary of the
        text itself, and whether it was cut."""
        text = text.strip()
        if n is None or len(text) <= n:  # a token is at least one character
            return text, False
        tok = self.formatter.tokenizer
        try:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets: decode the first n ids instead
            ids = tok(text, add_special_tokens=False)["input_ids"]
            return (tok.decode(ids[:n]), True) if len(ids) > n else (text, False)
        if len(enc["input_ids"]) <= n:
            return text, False
        return text[: enc["offset_mapping"][n - 1][1]], True

    async def run(
        self, encoded: Sequence[Encoded], reservation: Reservation | None = None, ticket: Ticket | None = None
    ) -> Scored:
        seqs = [PromptSplit(e.ids, e.prompt_len) for e in encoded]  # the canonical forward splits at the prompt
        if self.log_texts:
            log.debug("scoring %d sequences: %s", len(seqs), [self.formatter.tokenizer.decode(s) for s in seqs])
        try:
            scores = await self.batcher.submit(seqs, reservation, ticket)
        except QueueFull as e:  # the hard cap (RMSERVE_MAX_QUEUED) at submission, or refused late by the batcher
            raise self._overloaded(e) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.metrics.failures.labels("inference").inc()
            raise InferenceFailed(f"the forward pass failed: {type(e).__name__}: {e}") from None
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            self.metrics.failures.labels("non_finite").inc()
            raise InferenceFailed(f"the model produced non-finite rewards for sequence(s) {bad}")
        for s in scores:
            self.metrics.rewards.observe(s)
        truncated = [e.truncated for e in encoded]
        self.metrics.truncated.inc(sum(truncated))
        return Scored(scores, truncated, sum(len(e.ids) for e in encoded))

    def check_normalize(self, on: bool) -> None:
        if on and not self.normalization:
            raise InvalidRequest(
                "normalize=true was asked but this model stores no normalization statistics",
                param="normalize",
            )

    def normalize(self, scores: Sequence[float], on: bool) -> list[float]:
        if not on:
            return list(scores)
        self.check_normalize(on)
        n = self.normalization
        assert n is not None
        return [(s - n["mean"]) / n["std"] for s in scores]


def keep_tokens(enc: Encoded, n: int | None, side: str = "left") -> Encoded:
    """vLLM's truncate_prompt_tokens on one encoded sequence: its last `n` ids ("left", vLLM's default,
    `TokenizeParams._token_truncation` in vllm/renderers/params.py) or its first `n` ("right"), marked
    truncated when anything was cut. The reward is read at the last id kept."""
    if n is None or len(enc.ids) <= n:
        return enc
    if side == "right":
        return Encoded(enc.ids[:n], min(enc.prompt_len, n), True)
    return Encoded(enc.ids[-n:], max(0, enc.prompt_len - (len(enc.ids) - n)), True)


def _chars(job: Job) -> int:
    """Characters of a job's prompt and answer (its cost before formatting)."""
    if job.prompt is None:
        prompt = 0
    elif isinstance(job.prompt, str):
        prompt = len(job.prompt)
    else:
        prompt = sum(len(m["content"]) for m in job.prompt)
    return prompt + len(job.response)
