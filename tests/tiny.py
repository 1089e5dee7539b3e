"""Tiny real architectures and a tiny real tokenizer, built in-process (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then knead and bake.",
    "Reward models score answers; better answers get higher scores than worse ones.",
    "GOOD answers are helpful and BAD answers are rude or wrong. Thanks for asking!",
    "0123456789 numbers, punctuation: ;,.!? and the end of the story.",
    "system user assistant You are a helpful assistant.",
]


def make_variant(name: str) -> Any:
    """Tokenizer variants the checkpoint tests cover:

    - chatml: pad == eos == <|im_end|>, the answer closed by eos plus a newline, a default system turn
      (Qwen2.5's template);
    - chatml_pad: the same with pad <|endoftext|> != eos; chatml_nopad: no pad token at all;
    - eos_alone: a ChatML template whose turns close with eos alone (no newline), pad == eos;
    - plain / plain_nopad: no chat template (GPT-2 style), pad == eos, or no pad;
    - plain_bos: no chat template, the tokenizer's post-processor adds BOS (<|im_start|>) to plain text
      (Llama-2 / Mistral-base style), pad == eos; plain_bos_eos: it adds BOS and appends EOS;
      plain_bos_eos_pad: the same with pad <|im_end|> != eos.
    Llama-3 headers closed by <|eot_id|> are tests/models/test_formatting.py `make_llama3_tokenizer`.
    """
    tok = make_tokenizer(chat_template=False) if name.startswith("plain") else make_tokenizer()
    if name.startswith("plain_bos"):
        from tokenizers import processors

        tok.add_special_tokens({"bos_token": "<|im_start|>"})
        bos, eos = tok.bos_token_id, tok.eos_token_id
        with_eos = name.startswith("plain_bos_eos")
        single = "<|im_start|> $A <|endoftext|>" if with_eos else "<|im_start|> $A"
        specials = [("<|im_start|>", bos), ("<|endoftext|>", eos)] if with_eos else [("<|im_start|>", bos)]
        tok._tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
        if name.endswith("_pad"):
            tok.pad_token = "<|im_end|>"
    if name == "chatml_pad":
        tok.pad_token = "<|endoftext|>"
    if name.endswith("nopad"):
        tok.pad_token = None
    if name == "eos_alone":
        tok.chat_template = CHATML_TEMPLATE.replace("'<|im_end|>' + '\n'", "'<|im_end|>'").replace(
            "You are a helpful assistant.<|im_end|>\n", "You are a helpful assistant.<|im_end|>"
        )
    return tok


def make_tokenizer(chat_template: bool = True, vocab_size: int = 400) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>" if chat_template else "<|endoftext|>",
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|im_end|>" if chat_template else "<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def make_llama(vocab_size: int, seed: int = 0) -> Any:
    return make_decoder("llama", vocab_size, seed, tie_word_embeddings=True)


def make_gpt2(vocab_size: int, seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512)
    return GPT2LMHeadModel(cfg).eval()


def save_lm(lm: Any, tokenizer: Any, path: Path) -> Path:
    lm.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


FAMILY_NAMES = {
    "llama": "Llama",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma2": "Gemma2",
    "gpt_neox": "GPTNeoX",
    "gpt2": "GPT2",
}


def family_config(kind: str, vocab_size: int, **extra: Any) -> Any:
    """A tiny config of a decoder family: hidden 32, 2 layers, 4 heads (2 KV heads where the family has them)."""
    import transformers

    name = FAMILY_NAMES[kind]
    if kind == "gpt2":
        kw: dict[str, Any] = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512}
    elif kind == "gpt_neox":
        kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        kw["max_position_embeddings"] = 512
    else:
        kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        kw |= {"num_key_value_heads": 2, "max_position_embeddings": 512}
        if kind in ("qwen3", "gemma2"):
            kw["head_dim"] = 8
    return getattr(transformers, f"{name}Config")(vocab_size=vocab_size, **(kw | extra))


def make_decoder(kind: str, vocab_size: int, seed: int = 0, **extra: Any) -> Any:
    """A tiny causal LM of a family in FAMILY_NAMES (llama, qwen2, qwen3, mistral, gemma2, gpt_neox, gpt2)."""
    import transformers

    torch.manual_seed(seed)
    cfg = family_config(kind, vocab_size, **extra)
    cls = "GPT2LMHeadModel" if kind == "gpt2" else f"{FAMILY_NAMES[kind]}ForCausalLM"
    return getattr(transformers, cls)(cfg).eval()


def make_seq_cls(kind: str, vocab_size: int, pad_token_id: int | None, seed: int = 0, num_labels: int = 1) -> Any:
    """A tiny `<Family>ForSequenceClassification` as TRL's RewardTrainer builds it (num_labels 1, the
    tokenizer's pad id in the config), every weight random (the head with a larger scale, so rewards differ)."""
    import transformers

    torch.manual_seed(seed)
    cfg = family_config(kind, vocab_size, num_labels=num_labels, pad_token_id=pad_token_id)
    model = getattr(transformers, f"{FAMILY_NAMES[kind]}ForSequenceClassification")(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return model


# -- chat-template siblings for parity with transformers (issue 30) ---------------------------------------
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # [INST] turns with spaces around contents, the answer closed by eos, a system turn as a prefix
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (  # turns closed by <end_of_turn> + newline; eos (<eos>) is not in the template at all
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PARITY_CORPUS = [
    *CORPUS,
    "First line.\n\nSecond line.\n\nThird line, and [INST] a question [/INST] an answer.",
    "How do I bake bread?\n\nMix flour and water.\n\nKnead and bake. Hello there. Be brief.",
    "A paragraph ends with a blank line.\n\n",  # a blank line at the end: "\n\n" becomes one token
]


def make_bpe(
    specials: list[str], bos: str | None, eos: str, pad: str | None, template: str, regex: str | None = None
) -> Any:
    """A tiny byte-level BPE trained on a corpus with blank lines (so `"\\n\\n"` is one token), GPT-2's split
    regex (SmolLM2's kind: a whitespace run before a letter splits as `"\\n" + "\\n"`) or `regex`, the given
    special tokens and chat template; bos prepended by the post-processor to plain text when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(PARITY_CORPUS * 20, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    return fast


def make_template_variant(name: str) -> Any:
    """Templates and pad/eos choices where a framework's text and rmserve's could part (issue 30):

    - llama3_pad_eos: Llama-3 headers, pad == eos == <|eot_id|> (what TRL saves when the tokenizer has no
      pad), BOS written in the template text and also added to plain text by the post-processor, GPT-2's
      split regex (`"\\n\\n"` before a word splits in two, as in SmolLM2's tokenizer);
    - mistral_inst: `[INST] q [/INST] a</s>`, spaces between markers and contents, pad == eos == </s> inside
      every earlier assistant turn;
    - gemma_turns: `<start_of_turn>model\\n a<end_of_turn>\\n`, eos (<eos>) never in the template, pad <pad>;
    - chatml_bytelevel: ChatML with pad == eos == <|im_end|> on the blank-line corpus.
    Plus tests/tiny.py `make_variant`'s chatml, chatml_pad, chatml_nopad and eos_alone."""
    if name == "llama3_pad_eos":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return make_bpe(specials, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", LLAMA3_TEMPLATE)
    if name == "mistral_inst":
        return make_bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", MISTRAL_TEMPLATE)
    if name == "gemma_turns":
        specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
        return make_bpe(specials, "<bos>", "<eos>", "<pad>", GEMMA_TEMPLATE)
    if name == "chatml_base":  # a base model's ChatML: turns closed by <|im_end|>, eos <|endoftext|> never written
        tok = make_bpe(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", CHATML_TEMPLATE
        )
        return tok
    if name == "chatml_bytelevel":
        return make_bpe(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE
        )
    return make_variant(name)
