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


def make_decoder(kind: str, vocab_size: int, seed: int = 0, **extra: Any) -> Any:
    """A tiny Llama, Qwen2 or Mistral causal LM: hidden 32, 2 layers, 4 heads (2 KV heads)."""
    import transformers

    name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
