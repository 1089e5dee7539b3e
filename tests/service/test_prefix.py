"""Shared-prefix scoring equals plain scoring (fp32, 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models.batching import shared_prefix_batches
from models.prefix import group_shared_prefixes, grouped_prefix_rewards, length_chunks, shared_prefix_rewards
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
    suffixes = [e.ids[p:] for e in encs]
    assert len(length_chunks([len(x) for x in suffixes])) > 1  # the answers run in several chunks
    with torch.no_grad():
        shared = shared_prefix_rewards(model, encs[0].ids[:p], suffixes).tolist()
        one_pass = shared_prefix_rewards(model, encs[0].ids[:p], suffixes, max_pad_ratio=1e9).tolist()
    for side in ("right", "left"):
        plain = model.score_ids([e.ids for e in encs], tok.pad_token_id, side=side)
        assert shared == pytest.approx(plain, abs=1e-4)
        assert one_pass == pytest.approx(plain, abs=1e-4)


def test_length_chunks_bound_padding() -> None:
    lengths = [3, 40, 5, 41, 4, 200, 39]
    chunks = length_chunks(lengths, 1.3)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        longest = max(lengths[i] for i in c)
        assert len(c) == 1 or longest * len(c) <= 1.3 * sum(lengths[i] for i in c)
    assert [sorted(lengths[i] for i in c) for c in chunks] == [[3, 4, 5], [39, 40, 41], [200]]
    assert length_chunks(lengths, 1e9) == [sorted(range(7), key=lambda i: lengths[i])]


def test_runtime_mixed_batch_with_and_without_sharing(llama_dir: Path) -> None:
    model, tok = _model(llama_dir)
    f = model.formatter(tok)
    other = [{"role": "user", "content": "Numbers, punctuation and the end of the story?"}]
    seqs = [f.encode(PROMPT, a).ids for a in ANSWERS] + [f.encode(other, a).ids for a in ANSWERS[:2]]
    seqs.append(f.encode("Hi", "Hello").ids)  # shares only the template's system header: too short a prefix
    seqs.append(f.encode_text("plain text with no template").ids)
    on = TorchRuntime(model, tok.pad_token_id, forward="padded", prefix_sharing=True, min_prefix=8)
    off = TorchRuntime(model, tok.pad_token_id, forward="padded", prefix_sharing=False)
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
    on = TorchRuntime(model, tok.pad_token_id, forward="padded", prefix_sharing=True, min_prefix=4)
    off = TorchRuntime(model, tok.pad_token_id, forward="padded", prefix_sharing=False)
    assert on.score(seqs) == pytest.approx(off.score(seqs), abs=1e-4)


def test_grouping_keeps_the_full_prompt_when_one_answer_was_truncated() -> None:
    """A prompt's answers where one had its oldest turn dropped (so it shares only the header): the
    others still share the whole prompt, not just the header."""
    header, turn1, turn2 = [1] * 20, [2] * 50, [3] * 40
    full = [header + turn1 + turn2 + [10 + k] * 5 for k in range(4)]
    cut = header + turn2 + [20] * 300
    groups, singles = group_shared_prefixes([*full, cut], min_prefix=16, min_saved=32)
    assert groups == [(110, [0, 1, 2, 3])] and singles == [4]
    # one short common prefix everywhere and nothing longer: all share it
    seqs = [header + [30 + k] * 10 for k in range(5)]
    assert group_shared_prefixes(seqs, 16, 32) == ([(20, [0, 1, 2, 3, 4])], [])
    assert group_shared_prefixes(seqs, 16, 200) == ([], [0, 1, 2, 3, 4])  # not worth a pass


def test_shared_prefix_batches_respect_budget_and_cover_everything() -> None:
    prompts = [[p] * 30 for p in range(1, 7)]
    seqs = [pr + [99] * (1 + (7 * i + j) % 13) for i, pr in enumerate(prompts) for j in range(3)]
    seqs += [[50 + k] * (5 + k) for k in range(5)]  # no shared prefix
    batches = shared_prefix_batches(seqs, 120, 64)
    assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
    groups, _ = group_shared_prefixes(seqs, 16, 32)
    for b in batches:
        cost = 0
        for plen, members in groups:
            inside = [i for i in members if i in b]
            cost += (plen + sum(len(seqs[i]) - plen for i in inside)) if inside else 0
        singles = [i for i in b if not any(i in m for _, m in groups)]
        assert cost <= 120 and (not singles or max(len(seqs[i]) for i in singles) * len(singles) <= 120)
    for _, members in groups:  # a 3-answer group (at most 30 + 39 tokens) always fits one batch
        assert sum(1 for b in batches if set(members) & set(b)) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_several_prompts_in_one_pass_equal_plain(arch: str, llama_dir: Path, gpt2_dir: Path) -> None:
    """Prompts of different lengths share one prefix pass (right padding) and their answers one or
    more suffix passes, each row on its own prompt's cache."""
    model, tok = _model(llama_dir if arch == "llama" else gpt2_dir)
    f = model.formatter(tok)
    prompts: list[Any] = [
        PROMPT,
        "Numbers, punctuation and the end of the story?",
        [{"role": "user", "content": "Short?"}],
        "A much longer question that goes on and on about bread, flour, water, yeast, salt and ovens.",
    ]
    groups = []
    plain_ids = []
    for i, pr in enumerate(prompts):
        encs = [f.encode(pr, a) for a in ANSWERS[: 2 + i % 3]]
        p = encs[0].prompt_len
        assert p > 0
        groups.append((encs[0].ids[:p], [e.ids[p:] for e in encs]))
        plain_ids.append([e.ids for e in encs])
    assert len({len(g[0]) for g in groups}) == len(groups)  # the prefixes differ in length
    with torch.no_grad():
        for ratio in (1.3, 1e9):  # several chunks, and everything in one pass of each kind
            got = grouped_prefix_rewards(model, groups, max_pad_ratio=ratio)
            for g, ids in zip(got, plain_ids, strict=True):
                assert g.tolist() == pytest.approx(model.score_ids(ids, tok.pad_token_id, side="right"), abs=1e-4)


def test_a_cache_that_cannot_be_copied_falls_back_to_one_group_at_a_time(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.prefix as prefix

    model, tok = _model(llama_dir)
    f = model.formatter(tok)
    groups, plain = [], []
    for pr in (PROMPT, "Another question, a little longer than the first one?"):
        encs = [f.encode(pr, a) for a in ANSWERS]
        p = encs[0].prompt_len
        groups.append((encs[0].ids[:p], [e.ids[p:] for e in encs]))
        plain.append(model.score_ids([e.ids for e in encs], tok.pad_token_id, side="right"))
    monkeypatch.setattr(prefix, "_copyable", lambda cache: False)
    with torch.no_grad():
        got = grouped_prefix_rewards(model, groups)
    for g, ref in zip(got, plain, strict=True):
        assert g.tolist() == pytest.approx(ref, abs=1e-4)
