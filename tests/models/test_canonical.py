"""The canonical forward: a sequence's reward is the same bits alone or in any batch, in fp32 and bf16,
for every family it covers; and it computes the same function as the padded forward (within rounding)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from models.canonical import COVERED, PromptSplit, canonical_rewards, pack, packed_cost, supports
from models.reward_model import RewardModel, collate

VOCAB = 300
WINDOW = 8  # a sliding window shorter than the sequences, so that it matters


def make_body(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny transformers body (no LM head) of `family`: hidden 32, 2 layers."""
    import transformers

    torch.manual_seed(seed)
    common: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 256}
    if family == "gpt2":
        cfg: Any = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
        body = transformers.GPT2Model(cfg)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **common
        )
        body = transformers.GPTNeoXModel(cfg)
    else:
        name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "gemma2": "Gemma2"}[family]
        extra: dict[str, Any] = {}
        if family == "mistral":
            extra = {"sliding_window": WINDOW}
        if family == "qwen3":
            extra = {"head_dim": 8}
        if family == "gemma2":  # alternating sliding/full layers, logit soft-capping, its own scaling
            extra = {
                "head_dim": 8,
                "sliding_window": WINDOW,
                "query_pre_attn_scalar": 16,
                "attn_logit_softcapping": 5.0,
            }
        cfg = getattr(transformers, f"{name}Config")(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
            **extra,
        )
        body = getattr(transformers, f"{name}Model")(cfg)
    return body.to(dtype).eval()


def make_model(family: str, dtype: torch.dtype = torch.float32) -> RewardModel:
    from models.reward_model import RewardConfig

    body = make_body(family, dtype)
    torch.manual_seed(1)
    model = RewardModel(body, RewardConfig(model_type=family, hidden_size=32))
    with torch.no_grad():
        model.head.weight.mul_(20)  # rewards spread enough that a changed bit would show
    return model.eval()


def pool(seed: int = 0, n_prompts: int = 16, answers: int = 5) -> list[PromptSplit]:
    """Sequences of 3..40 tokens: `answers` answers to each of `n_prompts` prompts (split at the prompt)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_prompts):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 20))]
        for _ in range(answers):
            answer = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))]
            out.append(PromptSplit(prompt + answer, len(prompt)))
    return out


def score(model: RewardModel, seqs: list[Any], tile_rows: int = 128) -> list[float]:
    with torch.inference_mode():
        return canonical_rewards(model.body, model.head, seqs, tile_rows=tile_rows).tolist()


FAMILIES = sorted(COVERED)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_function_as_the_padded_forward(family: str) -> None:
    """Split or not, packed or not, the canonical reward is the model's reward (fp32 rounding aside),
    sliding windows and soft-capping included."""
    model = make_model(family)
    seqs = pool(3, n_prompts=4, answers=3)
    plain = [list(s) for s in seqs]
    with torch.inference_mode():
        ids, mask = collate(plain, 0)
        ref = model(ids, mask).tolist()
    assert max(abs(a - b) for a, b in zip(score(model, seqs), ref, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(score(model, plain, tile_rows=16), ref, strict=True)) < 1e-4
    assert len({round(r, 4) for r in ref}) > len(ref) // 2  # not a constant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_alone_equals_any_batch_exactly(family: str, dtype: torch.dtype) -> None:
    """A sequence's reward alone == its reward in batches of 2..64 random batch-mates, in any order,
    with its prompt shared by other answers in the pass or not, and as a plain (unsplit) sequence."""
    model = make_model(family, dtype)
    seqs = pool(7)
    rng = random.Random(11)
    targets = [0, 17, 33]
    alone = {t: score(model, [seqs[t]])[0] for t in targets}
    plain_alone = {t: score(model, [list(seqs[t])])[0] for t in targets}
    others = [i for i in range(len(seqs)) if i not in targets]
    siblings = {t: [i for i in others if i // 5 == t // 5] for t in targets}  # answers to the same prompt

    def check(batch: list[int], plain: bool, what: str) -> None:
        rng.shuffle(batch)
        got = score(model, [list(seqs[i]) if plain and i in targets else seqs[i] for i in batch])
        for t in targets:
            if t in batch:
                want = plain_alone[t] if plain else alone[t]
                assert got[batch.index(t)] == want, (family, str(dtype), len(batch), what, t)

    check([targets[0], rng.choice(others)], False, "pair")
    check([targets[1], siblings[targets[1]][0]], False, "pair sharing its prompt")
    for size in (7, 23, 64):
        strangers = [i for i in others if all(i not in siblings[t] for t in targets)]
        check([*targets, *rng.sample(strangers, size - len(targets))], False, "strangers")
        shared = [i for t in targets for i in siblings[t]]
        check([*targets, *(shared + rng.sample(strangers, size))[: size - len(targets)]], False, "prompts shared")
        check([*targets, *rng.sample(others, size - len(targets))], True, "unsplit")


def test_pack_lays_out_prompts_once_in_whole_tiles() -> None:
    a = PromptSplit([1, 2, 3, 4, 5], 3)
    b = PromptSplit([1, 2, 3, 9], 3)
    c = [7, 8]
    p = pack([a, b, c], tile_rows=16, pad_id=0)
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5, 9, 7, 8] + [0] * 8]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, *list(range(8))]]
    assert p.last.tolist() == [4, 5, 7]
    assert [(s.start, s.length, s.context) for s in p.segments] == [
        (0, 3, None),
        (3, 2, 0),
        (5, 1, 0),
        (6, 2, None),
        (8, 8, None),
    ]
    assert p.real_tokens == 8 == packed_cost([a, b, c])
    assert p.mask(1, None, torch.device("cpu")).tolist() == [[True, True, True, True, False], [True] * 5]
    assert p.mask(1, 2, torch.device("cpu")).tolist() == [
        [False, False, True, True, False],
        [False, False, False, True, True],
    ]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pack([[1], []], 8, 0)


def test_prompt_boundary_outside_the_sequence_means_no_split() -> None:
    p = pack([PromptSplit([1, 2, 3], 3), PromptSplit([4, 5], 0)], tile_rows=4, pad_id=0)
    assert [(s.start, s.length, s.context) for s in p.segments] == [(0, 3, None), (3, 2, None), (5, 3, None)]


def test_families_outside_the_covered_list_are_not_claimed() -> None:
    from transformers import OPTConfig, OPTModel

    body = OPTModel(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2))
    assert not supports(body)
    assert supports(make_body("llama"))
