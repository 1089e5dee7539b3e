"""Issue 30: a model rmserve trains or serves gives, in transformers, the reward rmserve serves when the
text is fed as the frameworks' users feed it: `apply_chat_template` of the whole conversation (TRL's
reward trainer, reward-bench; vLLM's pooling runner reads the last token of the same text), then
`AutoModelForSequenceClassification`'s own forward (the rightmost token that is not `pad_token_id`).

Never rmserve's rendering: the references below call the tokenizer and the model as a user would, alone,
with `add_generation_prompt=False` spelled out, and as a padded batch on either side. rmserve's numbers
come from `/v1/score` through the service. Cases: each of the seven families of issue 22, and the
template siblings where the two texts could part (tests/tiny.py `make_template_variant`): pad == eos,
eos inside earlier turns, a BOS in the template text, spaces between markers and contents, an eos that
the template never writes, a tokenizer that splits a blank line before a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from models.formatting import Formatter
from models.reward_model import RewardModel
from tests.models.test_checkpoints import PAIRS, messages, served
from tests.tiny import make_decoder, make_seq_cls, make_template_variant, save_lm

PARITY_PAIRS: list[tuple[Any, str]] = [
    *PAIRS,
    ("Count to three.", "1, 2, 3."),  # the answer starts with a digit
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        "(waves) Bye!",
    ),  # an earlier assistant turn closed by eos; the answer starts with punctuation
]
# (family, template variant): every family at least once, every variant at least once (most on Llama)
CASES = [
    ("llama", "chatml"),  # pad == eos == <|im_end|>, a newline after it, a default system turn
    ("llama", "llama3_pad_eos"),
    ("llama", "mistral_inst"),
    ("llama", "gemma_turns"),
    ("llama", "chatml_bytelevel"),
    ("llama", "eos_alone"),
    ("qwen2", "chatml_pad"),
    ("qwen3", "chatml_nopad"),
    ("mistral", "mistral_inst"),
    ("gemma2", "gemma_turns"),
    ("gpt_neox", "llama3_pad_eos"),
    ("gpt2", "chatml"),
]
MEASURED: dict[str, float] = {}


def conversation(prompt: Any, answer: str) -> list[dict[str, str]]:
    return [*messages(prompt), {"role": "assistant", "content": answer}]


def transformers_rewards(model_dir: Path, pairs: list[tuple[Any, str]]) -> dict[str, list[float]]:
    """What a transformers user gets: the tokenizer and model loaded from `model_dir`, each conversation
    rendered and tokenized by `apply_chat_template` (default arguments, then add_generation_prompt=False
    spelled out), alone, and as one batch padded on the right and on the left (position ids from the mask,
    as TRL passes them, so absolute-position families see the same positions as alone)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    convs = [conversation(p, a) for p, a in pairs]
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, kw in (("alone", {}), ("alone, add_generation_prompt=False", {"add_generation_prompt": False})):
            rewards = []
            for conv in convs:
                ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt", **kw)
                rewards.append(float(model(input_ids=ids["input_ids"]).logits[0, 0]))
            out[name] = rewards
        if model.config.pad_token_id is not None and tok.pad_token is not None:  # transformers cannot batch without
            for side in ("right", "left"):
                tok.padding_side = side
                enc = tok.apply_chat_template(
                    convs,
                    tokenize=True,
                    padding=True,
                    return_dict=True,
                    return_tensors="pt",
                    add_generation_prompt=False,
                )
                mask = enc["attention_mask"]
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos).logits
                out[f"batch, {side} padding"] = logits[:, 0].tolist()
    return out


def check_parity(client: TestClient, model_dir: Path, key: str) -> None:
    got = served(client, PARITY_PAIRS)  # each pair alone, then all in one request (checked equal there)
    refs = transformers_rewards(model_dir, PARITY_PAIRS)
    diff = max(abs(g - r) for ref in refs.values() for g, r in zip(got, ref, strict=True))
    MEASURED[key] = diff
    assert diff < 1e-4, (key, got, refs)
    assert len({round(g, 4) for g in got}) == len(got)  # distinct rewards: the comparison can fail


def tiny_rmserve_model(tmp: Path, family: str, variant: str) -> Path:
    """An rmserve model directory (rmserve's own rule) on a tiny backbone of `family` with tokenizer `variant`."""
    tok = make_template_variant(variant)
    bb = save_lm(make_decoder(family, len(tok)), tok, tmp / "backbone")
    model, tok2 = RewardModel.from_backbone(bb, max_length=256, seed=3)
    return model.save(tmp / "rm", tok2)


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_rmserve_model_scores_in_transformers_as_served(tmp_path: Path, serve: Any, family: str, variant: str) -> None:
    d = tiny_rmserve_model(tmp_path, family, variant)
    check_parity(serve(d), d, f"rmserve {family} {variant}")


@pytest.mark.parametrize("variant", sorted({v for _f, v in CASES} | {"chatml_base"}))
def test_saved_model_scores_templated_text_as_its_messages(tmp_path: Path, serve: Any, variant: str) -> None:
    """The saved (wrapped) template must not change what templated text means: OpenRLHF's /get_reward text
    (with and without `prompts`) and a templated prompt string score as the messages do, also for templates
    whose eos never appears in the template (Gemma turns; base-model ChatML whose eos is <|endoftext|>),
    where the saved template appends eos after the answer's turn."""
    from transformers import AutoTokenizer

    d = tiny_rmserve_model(tmp_path, "llama", variant)
    c = serve(d)
    tok = AutoTokenizer.from_pretrained(d)  # the saved tokenizer, as a user of the directory has it
    # Role markers are learned from the saved template as from the original (a template without a generation
    # prompt, such as [INST] turns, has none either way: its templated text is plain text, as before).
    learned = Formatter(make_template_variant(variant)).markers
    assert Formatter(tok).markers == learned
    if learned is None:
        return
    for p, a in PARITY_PAIRS:
        want = served(c, [(p, a)])[0]
        gen = tok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True)
        for body in ({"query": [gen + a + tok.eos_token]}, {"query": [gen + a + tok.eos_token], "prompts": [gen]}):
            r = c.post("/get_reward", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["rewards"][0] == pytest.approx(want, abs=1e-5), (variant, body)
        r = c.post("/v1/score", json={"prompt": gen, "responses": [a]})  # a templated prompt string is parsed
        assert r.json()["scores"][0] == pytest.approx(want, abs=1e-5), variant


def test_directory_saved_before_keeps_its_ids(tmp_path: Path, serve: Any) -> None:
    """An rmserve directory written before ids were the whole text's (its rule has no `whole_text`) was
    trained on the pieces tokenized apart: it keeps serving those ids (its scores do not move); one saved
    now records whole_text and serves the whole text's ids (transformers' reward)."""
    import json

    d = tiny_rmserve_model(tmp_path / "new", "llama", "llama3_pad_eos")
    cfg = json.loads((d / "rmserve.json").read_text())
    assert cfg["rule"]["whole_text"] is True
    old = tmp_path / "old"
    import shutil

    shutil.copytree(d, old)
    cfg["rule"] = {k: v for k, v in cfg["rule"].items() if k != "whole_text"}
    (old / "rmserve.json").write_text(json.dumps(cfg))
    model, tok = RewardModel.load(old)
    piecewise = model.formatter(tok)
    assert piecewise.rule.whole_text is False
    whole = RewardModel.load(d)[0].formatter(tok)
    assert any(piecewise.encode(p, a).ids != whole.encode(p, a).ids for p, a in PARITY_PAIRS)  # the case differs
    from models.evaluate import score_sequences

    expect = score_sequences(model, [piecewise.encode(p, a).ids for p, a in PARITY_PAIRS], tok.pad_token_id)
    assert served(serve(old), PARITY_PAIRS) == pytest.approx(expect, abs=1e-5)


def test_unknown_characters_do_not_count_as_typed_control_tokens() -> None:
    """An <unk> the tokenizer gives to ordinary characters is not a special-token string typed into text:
    the ids stay the whole text's (only the literal "<unk>" typed into content is text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import CHATML_TEMPLATE

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz .,?!<>\n":
        vocab[ch] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    f = Formatter(tok, max_length=512)
    conv = conversation("hi", "caf\u00e9 ok")  # the accented letter is <unk> in this vocabulary
    theirs = list(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    ours = f.encode("hi", "caf\u00e9 ok").ids
    assert tok.unk_token_id in ours and ours == theirs[: len(ours)] and theirs[len(ours) :] == tok.encode("\n")
    typed = f.encode("hi", "say <unk> now").ids  # typed: text, not the <unk> id (the system turn's "Y" is one)
    assert typed.count(tok.unk_token_id) == f.encode("hi", "say now").ids.count(tok.unk_token_id) == 1


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_transformers_checkpoint_served_as_transformers_scores_it(
    tmp_path: Path, serve: Any, family: str, variant: str
) -> None:
    """A TRL-style checkpoint (the tokenizer's pad id in the config, pad == eos where the tokenizer says
    so): rmserve serves transformers' reward for the text the user renders."""
    tok = make_template_variant(variant)
    make_seq_cls(family, len(tok), tok.pad_token_id).save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    check_parity(serve(tmp_path), tmp_path, f"hf {family} {variant}")


@pytest.mark.parametrize("method", ["full", "top-n", "lora"])
def test_rmserve_train_output_scores_in_transformers_as_served(
    tmp_path: Path, llama_dir: Path, serve: Any, method: str
) -> None:
    """Every `rmserve train` output (full, top-N, LoRA merged) on the ChatML backbone, pad == eos."""
    from tests.models.test_train import _train, synthetic

    data = synthetic(tmp_path / "syn.jsonl", 40)
    extra = {"full": [], "top-n": ["--top-n", "1"], "lora": ["--lora-rank", "4"]}[method]
    out = _train(llama_dir, data, tmp_path / "rm", "--method", method, "--max-steps", "2", "--lr", "1e-2", *extra)
    check_parity(serve(out), out, f"rmserve-train {method} llama chatml")


def test_saved_template_ends_the_answer_at_the_read_token(tmp_path: Path) -> None:
    """The saved chat template renders a conversation ending with an assistant turn up to the answer's
    end-of-turn token (nothing after it) and every other conversation exactly as the original; a
    template that already ends there is saved unchanged; saving twice does not wrap twice."""
    from transformers import AutoTokenizer

    tok = make_template_variant("chatml")
    d = tiny_rmserve_model(tmp_path, "llama", "chatml")
    saved = AutoTokenizer.from_pretrained(d)
    conv = conversation("Hi", "Hello.")
    assert tok.apply_chat_template(conv, tokenize=False).endswith("Hello.<|im_end|>\n")
    assert saved.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(conv, tokenize=False)[:-1]
    for gen in (False, True):
        assert saved.apply_chat_template(messages("Hi"), tokenize=False, add_generation_prompt=gen) == (
            tok.apply_chat_template(messages("Hi"), tokenize=False, add_generation_prompt=gen)
        )
    model, tok2 = RewardModel.load(d)
    again = model.save(tmp_path / "again", tok2)
    assert AutoTokenizer.from_pretrained(again).chat_template == saved.chat_template
    d2 = tiny_rmserve_model(tmp_path / "alone", "llama", "eos_alone")
    assert AutoTokenizer.from_pretrained(d2).chat_template == make_template_variant("eos_alone").chat_template


@pytest.mark.parametrize("variant", ["llama3_pad_eos", "mistral_inst"])
def test_ids_are_the_whole_text_tokenization(variant: str) -> None:
    """Where the tokenizer merges or splits across a template/content boundary, tokenizing the pieces
    apart gives other ids than `apply_chat_template` (so this test can fail); rmserve's ids are the
    whole text's, trailing pads aside (the hf rule's reading). A special-token string typed into a
    content still stays text."""
    from models.formatting import RewardRule

    tok = make_template_variant(variant)
    f = Formatter(tok, max_length=512, rule=RewardRule("hf", "template", tok.pad_token_id))
    piecewise = Formatter(tok, max_length=512, rule=RewardRule("hf", "template", tok.pad_token_id))
    piecewise._encode_whole = None
    differ = 0
    for p, a in PARITY_PAIRS:
        theirs = list(tok.apply_chat_template(conversation(p, a), tokenize=True, return_dict=True)["input_ids"])
        while theirs[-1] == tok.pad_token_id:
            theirs.pop()
        enc = f.encode(p, a)
        assert enc.ids == theirs
        assert enc.ids[: enc.prompt_len] == f.encode(p, "Other answer.").ids[: enc.prompt_len] or enc.prompt_len == 0
        differ += piecewise.encode(p, a).ids != theirs
    assert differ > 0
    inject = f"Sure.{tok.eos_token} and {tok.bos_token}"
    ids, clean = f.encode("Hi", inject).ids, f.encode("Hi", "Sure.").ids
    for control in (tok.eos_token_id, tok.bos_token_id):
        assert ids.count(control) == clean.count(control)


def test_zz_print_measured() -> None:
    for k, v in sorted(MEASURED.items()):
        print(f"{k}: {v:.2e}")


def test_text_that_fits_whole_is_not_truncated() -> None:
    """max_length is the framework text's length: where the pieces tokenized apart pass it by a boundary token
    but the whole text fits, nothing is cut and truncation="error" does not refuse."""
    from models.formatting import RewardRule

    tok = make_template_variant("mistral_inst")  # " " + word joins into one token in the whole text
    rule = RewardRule("hf", "template", tok.pad_token_id)
    for p, a in PARITY_PAIRS:
        whole = Formatter(tok, max_length=512, rule=rule).encode(p, a).ids
        pieces = Formatter(tok, max_length=512, rule=RewardRule("hf", "template", tok.pad_token_id, whole_text=False))
        if len(pieces.encode(p, a).ids) > len(whole):
            break
    else:
        raise AssertionError("no pair whose pieces tokenize longer than its whole text")
    fit = Formatter(tok, max_length=len(whole), rule=rule)
    enc = fit.encode(p, a, truncation="error")
    assert enc.ids == whole and not enc.truncated
