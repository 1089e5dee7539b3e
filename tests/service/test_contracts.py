"""Contract tests: the real client libraries (or, where a library cannot be installed without a GPU
stack, its request replicated exactly from its source) against a live server on a free loopback port.

- cohere SDK v1 (`cohere.Client().rerank`, POST /v1/rerank) and v2 (`cohere.ClientV2().rerank`,
  POST /v2/rerank): skipped with the reason when the `cohere` package is not installed.
- OpenRLHF's remote reward model request: the `openrlhf` package pulls torch, deepspeed, ray and vllm,
  so its request is replicated from its source: 0.11's `SingleTurnAgentExecutor._fetch_rewards_via_http`
  (openrlhf/utils/agent.py) posts `{"query", "prompts", "labels"}` as JSON and reads `rewards`; <= 0.9's
  `remote_rm_fn` (openrlhf/utils/remote_rm_utils.py) posts the same body with `requests` and reads
  `response.json()["rewards"]`, the whole rollout batch in one call.
- TRL's reward-function call convention (trl/trainer/grpo_trainer.py `_calculate_rewards`):
  `reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns)` with plain,
  conversational and tool-call completions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.client import RewardClient, RewardFunction
from service.settings import Settings
from tests.service.conftest import live_server

PROMPT = "How do I bake bread?"
ANSWERS = ["Mix flour, water, yeast and salt, then knead and bake.", "No idea.", "Thanks for asking!"]


@pytest.fixture(scope="module")
def server(rm_dir: Path) -> Iterator[str]:
    with live_server(Settings(model=str(rm_dir), api_key="k")) as url:
        yield url


@pytest.fixture(scope="module")
def ours(server: str) -> list[float]:
    with RewardClient(server, api_key="k") as rc:
        return rc.score(PROMPT, ANSWERS)


def test_cohere_sdk_v1_rerank(server: str, ours: list[float]) -> None:
    cohere = pytest.importorskip("cohere", reason="the cohere SDK is not installed (pip install cohere)")
    co = cohere.Client(api_key="k", base_url=server)
    res = co.rerank(model="rerank-english-v3.0", query=PROMPT, documents=ANSWERS, top_n=2, return_documents=True)
    order = sorted(range(3), key=lambda i: -ours[i])
    assert [r.index for r in res.results] == order[:2]
    assert [r.relevance_score for r in res.results] == pytest.approx([ours[i] for i in order[:2]], abs=1e-5)
    assert res.results[0].document is not None and res.results[0].document.text == ANSWERS[order[0]]
    assert res.id and res.meta is not None and res.meta.billed_units is not None
    assert res.meta.billed_units.search_units == 1 and res.meta.api_version is not None


def test_cohere_sdk_v2_rerank(server: str, ours: list[float]) -> None:
    cohere = pytest.importorskip("cohere", reason="the cohere SDK is not installed (pip install cohere)")
    co = cohere.ClientV2(api_key="k", base_url=server)
    res = co.rerank(model="rerank-v3.5", query=PROMPT, documents=ANSWERS, top_n=3)
    order = sorted(range(3), key=lambda i: -ours[i])
    assert [r.index for r in res.results] == order
    assert [r.relevance_score for r in res.results] == pytest.approx([ours[i] for i in order], abs=1e-5)
    assert res.meta is not None and res.meta.billed_units is not None
    assert res.meta.billed_units.search_units == 1 and (res.meta.billed_units.input_tokens or 0) > 0
    assert res.meta.api_version is not None and res.meta.api_version.version == "2"
    # A relevance_score in (0, 1), as Cohere documents it, when asked for (an extra body field).
    sig = co.rerank(
        model="rerank-v3.5",
        query=PROMPT,
        documents=ANSWERS,
        request_options={"additional_body_parameters": {"use_activation": True}},
    )
    assert [r.relevance_score for r in sig.results] == pytest.approx(
        [1 / (1 + math.exp(-ours[i])) for i in order], abs=1e-6
    )
    with pytest.raises(cohere.core.ApiError) as e:
        cohere.ClientV2(api_key="wrong", base_url=server).rerank(model="m", query="q", documents=["d"])
    assert e.value.status_code == 401


def openrlhf_remote_rm_fn(api_url: str, queries: list[str], prompts: list[str], labels: list[str]) -> list[float]:
    """OpenRLHF <= 0.9 `remote_rm_fn` / 0.11 `_fetch_rewards_via_http` for one reward server: the same
    JSON body, header and 180 s timeout, `raise_for_status()`, then the `rewards` key."""
    payload = {"query": queries, "prompts": prompts, "labels": labels}
    response = httpx.post(
        api_url,
        json=payload,
        headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
        timeout=180,
    )
    response.raise_for_status()
    return [float(x) for x in response.json()["rewards"]]


def test_openrlhf_remote_rm_request_with_a_rollout_batch(server: str) -> None:
    n = 1024  # OpenRLHF's examples use rollout batches of 1,024
    queries = [f"<|im_start|>user\nQ{i}?<|im_end|>\n<|im_start|>assistant\nA{i % 5}.<|im_end|>" for i in range(n)]
    rewards = openrlhf_remote_rm_fn(f"{server}/get_reward", queries, [f"Q{i}?" for i in range(n)], [""] * n)
    assert len(rewards) == n and all(math.isfinite(r) for r in rewards)
    again = openrlhf_remote_rm_fn(f"{server}/get_reward", queries[:3], ["", "", ""], ["", "", ""])
    assert again == pytest.approx(rewards[:3], abs=1e-5)


def test_trl_reward_function_plain_conversational_and_tool_calls(server: str) -> None:
    rf = RewardFunction(RewardClient(server, api_key="k"), batch_size=2)
    with RewardClient(server, api_key="k") as rc:
        ref = rc.score_items(
            [
                (PROMPT, ANSWERS[0]),
                ([{"role": "user", "content": PROMPT}], ANSWERS[1]),
                (
                    [{"role": "user", "content": "Weather in Paris?"}],
                    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                ),
                (
                    [{"role": "user", "content": "Weather in Paris?"}],
                    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                    "</tool_call>\n<tool_response>\nsunny\n</tool_response>\nIt is sunny.",
                ),
                ([{"role": "user", "content": "Hi"}], " "),
            ]
        )
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    weather = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}]
    got = rf(
        prompts=[PROMPT, [{"role": "user", "content": PROMPT}], weather, weather, [{"role": "user", "content": "Hi"}]],
        completions=[
            ANSWERS[0],  # plain
            [{"role": "assistant", "content": ANSWERS[1]}],  # conversational
            [{"role": "assistant", "content": None, "tool_calls": [call]}],  # a tool call, content None
            [
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}], "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "0"},
                {"role": "assistant", "content": "It is sunny."},
            ],
            [{"role": "assistant"}],  # no content at all
        ],
        completion_ids=[[1]] * 5,
        trainer_state=None,
    )
    assert got == pytest.approx(ref, abs=1e-5)
