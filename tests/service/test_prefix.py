"""Shared-prefix scoring equals plain scoring (fp32, 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models.prefix import group_shared_prefixes, shared_prefix_rewards
from models.reward_model import RewardModel
from service.runtimes.torch_runtime import TorchRuntime

PROMPT = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "How do I bake bread? Tell me the steps, the quick brown fox way."},
]
ANSWERS = ["Mix flour.", "No", "Knead, then bake for an hour. Thanks for asking!", "0123456789 " * 4]


def _model(path: Path) -> tuple[RewardModel, Any]:
    m, tok = RewardModel.from_backbone(path, max_length=256, seed=5)
    return m.eval(), tok


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_equals_plain(arch: str, llama_dir: Path, gpt2_dir: Path) -> None:
    model, tok = _model(llama_dir if arch == "llama" else gpt2_dir)
    f = model.formatter(tok)
    encs = [f.encode(PROMPT, a) for a in ANSWERS]
    p = encs[0].prompt_len
    assert p > 0 and all(e.ids[:p] == encs[0].ids[:p] for e in encs)
    with torch.no_grad():
        shared = shared_prefix_rewards(model, encs[0].ids[:p], [e.ids[p:] for e in encs]).tolist()
    for side in ("right", "left"):
        plain = model.score_ids([e.ids for e in encs], tok.pad_token_id, side=side)
        assert shared == pytest.approx(plain, abs=1e-4)


def test_runtime_mixed_batch_with_and_without_sharing(llama_dir: Path) -> None:
    model, tok = _model(llama_dir)
    f = model.formatter(tok)
    other = [{"role": "user", "content": "Numbers, punctuation and the end of the story?"}]
    seqs = [f.encode(PROMPT, a).ids for a in ANSWERS] + [f.encode(other, a).ids for a in ANSWERS[:2]]
    seqs.append(f.encode("Hi", "Hello").ids)  # shares only the template's system header: too short a prefix
    seqs.append(f.encode_text("plain text with no template").ids)
    on = TorchRuntime(model, tok.pad_token_id, prefix_sharing=True, min_prefix=8)
    off = TorchRuntime(model, tok.pad_token_id, prefix_sharing=False)
    got, ref = on.score(seqs), off.score(seqs)
    assert got == pytest.approx(ref, abs=1e-4)
    assert on.shared_sequences >= len(ANSWERS) + 2 and off.shared_sequences == 0
    alone = [off.score([s])[0] for s in seqs]
    assert got == pytest.approx(alone, abs=1e-4)


def test_prompt_whose_tokens_merge_with_the_answer(tokenizer: Any, llama_dir: Path) -> None:
    """Raw texts (as /get_reward sends them) share whatever token prefix they really share."""
    model, tok = _model(llama_dir)
    texts = [
        "The quick brown fox jumps over the lazy dog. GOOD answers",
        "The quick brown fox jumps over the lazy dogs",
        "The quick brown fox jumps over the lazy dog. BAD",
    ]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    groups, singles = group_shared_prefixes(seqs, min_prefix=4, min_saved=4)
    assert groups and sorted(i for _, g in groups for i in g) + sorted(singles) == sorted(range(3))
    on = TorchRuntime(model, tok.pad_token_id, prefix_sharing=True, min_prefix=4)
    off = TorchRuntime(model, tok.pad_token_id, prefix_sharing=False)
    assert on.score(seqs) == pytest.approx(off.score(seqs), abs=1e-4)
