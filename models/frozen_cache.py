"""Frozen-bottom feature caching for top-N fine-tuning.

With `--method top-n` the bottom L - N layers never change, so their output for each training
sequence is computed once (inference mode) and kept in memory; every epoch and every dev evaluation
then runs only the top N layers on the cached states. Exact for decoder bodies that feed
`inputs_embeds` straight into their layers (Llama, Mistral, Qwen2/3): tested against the full model.

`DiskFeatures` keeps those states on disk so that a later run reuses them: one folder per key (the
frozen weights' fingerprint, the data files' hashes, max length, frozen layers, storage dtype and the
token ids themselves), filled in chunks of whole sequences, each written under a temporary name and
renamed when complete, so a run cut midway resumes from its last complete chunk. Readers map the
chunk files (copy-on-write), so the cache need not fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.backbone import tensors_fingerprint
from models.batching import length_batches
from models.reward_model import RewardModel, collate, last_token_index, position_ids_from_mask

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
KEY_FILE = "key.json"
# On-disk element type of each storage dtype: bf16 goes through numpy as its raw 16 bits.
_NP_DTYPES = {torch.float32: (np.float32, torch.float32), torch.bfloat16: (np.int16, torch.int16)}


def supports_cache(body: Any) -> bool:
    return str(getattr(body.config, "model_type", "")) in SUPPORTED and isinstance(
        getattr(body, "layers", None), nn.ModuleList
    )


@contextmanager
def only_layers(body: Any, layers: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily run the body with a subset of its decoder layers (same module objects)."""
    full = body.layers
    body.layers = nn.ModuleList(layers)
    try:
        yield
    finally:
        body.layers = full


@torch.inference_mode()
def frozen_features(
    model: RewardModel, seqs: Sequence[Sequence[int]], n_top: int, pad_id: int, batch_tokens: int = 8192
) -> list[torch.Tensor]:
    """Output of layer L - n_top for each sequence: a list of (T_i, H) float32 tensors."""
    body = model.body
    layers = list(body.layers)
    k = len(layers) - n_top
    if k < 1:
        raise ValueError(f"caching needs at least one frozen layer; top-n {n_top} of {len(layers)} leaves none")
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        captured["h"] = out[0] if isinstance(out, tuple) else out

    from tqdm import tqdm

    handle = layers[k - 1].register_forward_hook(hook)
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    batches = length_batches([len(s) for s in seqs], batch_tokens)
    bar = tqdm(total=sum(len(s) for s in seqs), desc="cache frozen layers", unit="tok", mininterval=5.0)
    try:
        with only_layers(body, layers[:k]):
            for idx in batches:
                ids, mask = collate([seqs[i] for i in idx], pad_id, "right", model.device)
                body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
                hs = captured["h"].float()  # (B, T, H)
                for j, i in enumerate(idx):
                    out[i] = hs[j, : len(seqs[i])].detach().cpu().clone()
                bar.update(sum(len(seqs[i]) for i in idx))
    finally:
        handle.remove()
        bar.close()
    return out


def rewards_from_features(model: RewardModel, feats: Sequence[torch.Tensor], n_top: int) -> torch.Tensor:
    """Run the top n_top layers, the final norm and the head on cached states: (N,) rewards."""
    body = model.body
    t = max(f.shape[0] for f in feats)
    h = feats[0].shape[1]
    x = torch.zeros(len(feats), t, h, dtype=torch.float32)  # bf16-stored states are widened here
    mask = torch.zeros(len(feats), t, dtype=torch.long)
    for i, f in enumerate(feats):
        x[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    x, mask = x.to(model.device), mask.to(model.device)
    layers = list(body.layers)
    with only_layers(body, layers[len(layers) - n_top :]):
        out = body(inputs_embeds=x, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    hs = out.last_hidden_state  # (B, T, H)
    last = last_token_index(mask)  # (B,)
    return model.head(hs[torch.arange(hs.shape[0], device=hs.device), last].float()).squeeze(-1)


class Features(Protocol):
    """Frozen-layer states by sequence index: a list in memory or a `DiskFeatures`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> torch.Tensor: ...


def frozen_fingerprint(model: RewardModel, n_top: int) -> str:
    """sha256 of what the cached states depend on: the embeddings, the bottom L - n_top layers and the
    rotary tables (not the top layers or the head, which train)."""
    body = model.body
    k = len(body.layers) - n_top
    named: list[tuple[str, torch.Tensor]] = [
        (f"embed_tokens.{n}", t) for n, t in body.embed_tokens.state_dict().items()
    ]
    for i in range(k):
        named += [(f"layers.{i}.{n}", t) for n, t in body.layers[i].state_dict().items()]
    rotary = getattr(body, "rotary_emb", None)
    if isinstance(rotary, nn.Module):
        named += [(f"rotary_emb.{n}", t) for n, t in rotary.named_buffers()]
    return tensors_fingerprint(named)


def sequences_fingerprint(seqs: Sequence[Sequence[int]]) -> str:
    """sha256 of the token ids, in order (so the split, sampling and formatting are part of the key)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


class DiskFeatures:
    """The frozen-layer states, (T_i, H) per sequence, of a fixed list of sequences in `folder`.

    Sequences are cut, in order, into chunks of about `chunk_tokens` tokens; chunk c is the file
    chunk-c.bin holding its sequences' states one after the other, (sum T_i, H) in `dtype`.
    """

    def __init__(
        self, folder: Path, lengths: Sequence[int], hidden: int, dtype: torch.dtype, chunk_tokens: int = 1 << 16
    ) -> None:
        if dtype not in _NP_DTYPES:
            raise ValueError(f"frozen cache dtype {dtype} is not supported; use float32 or bfloat16")
        self.folder, self.lengths, self.hidden, self.dtype = folder, list(lengths), hidden, dtype
        self.chunks: list[tuple[int, int]] = []  # (first sequence, end sequence) of each chunk
        self.where: list[tuple[int, int]] = []  # (chunk, first token row) of each sequence
        start, rows = 0, 0
        for i, n in enumerate(self.lengths):
            if rows and rows + n > chunk_tokens:
                self.chunks.append((start, i))
                start, rows = i, 0
            self.where.append((len(self.chunks), rows))
            rows += n
        if self.lengths:
            self.chunks.append((start, len(self.lengths)))
        self._maps: dict[int, np.ndarray] = {}

    def path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:05d}.bin"

    def chunk_rows(self, c: int) -> int:
        a, b = self.chunks[c]
        return sum(self.lengths[a:b])

    def complete(self, c: int) -> bool:
        p = self.path(c)
        itemsize = np.dtype(_NP_DTYPES[self.dtype][0]).itemsize
        return p.is_file() and p.stat().st_size == self.chunk_rows(c) * self.hidden * itemsize

    def write(self, c: int, feats: Sequence[torch.Tensor]) -> None:
        """Write chunk c (its sequences' states in order) atomically: a temporary file, then a rename."""
        a, b = self.chunks[c]
        if len(feats) != b - a or any(
            f.shape != (n, self.hidden) for f, n in zip(feats, self.lengths[a:b], strict=True)
        ):
            raise ValueError(f"chunk {c} expects {b - a} states shaped (T_i, {self.hidden})")
        data = torch.cat(list(feats)).to(self.dtype).contiguous().view(_NP_DTYPES[self.dtype][1]).numpy()
        tmp = self.path(c).with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            data.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(c))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, row = self.where[i]
        if c not in self._maps:
            np_dtype = _NP_DTYPES[self.dtype][0]
            self._maps[c] = np.memmap(self.path(c), np_dtype, mode="c", shape=(self.chunk_rows(c), self.hidden))
        t = torch.from_numpy(self._maps[c][row : row + self.lengths[i]])
        return t.view(self.dtype) if self.dtype == torch.bfloat16 else t


def cached_features(
    model: RewardModel,
    seqs: Sequence[Sequence[int]],
    n_top: int,
    pad_id: int,
    *,
    cache_dir: Path | None,
    key: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = 8192,
    chunk_tokens: int = 1 << 16,
) -> tuple[Features, int]:
    """Frozen-layer states of `seqs` (indexable by sequence) and how many sequences were computed.

    Without `cache_dir` they are computed and kept in memory. With it they live in
    cache_dir/<digest of key + token ids + storage dtype>/: complete chunks found there are reused,
    the missing ones computed and written one at a time (a cut run resumes from its last complete one).
    """
    if cache_dir is None:
        return [f.to(dtype) for f in frozen_features(model, seqs, n_top, pad_id, batch_tokens)], len(seqs)
    full_key = {**key, "frozen_layers": len(model.body.layers) - n_top, "dtype": str(dtype).removeprefix("torch.")}
    full_key["sequences"] = sequences_fingerprint(seqs)
    folder = cache_dir / hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEY_FILE).write_text(json.dumps(full_key, indent=2, sort_keys=True) + "\n")
    store = DiskFeatures(folder, [len(s) for s in seqs], int(model.config.hidden_size), dtype, chunk_tokens)
    missing = [c for c in range(len(store.chunks)) if not store.complete(c)]
    status = "hit" if not missing else "miss" if len(missing) == len(store.chunks) else "resumed"
    computed = 0
    for c in missing:
        a, b = store.chunks[c]
        store.write(c, frozen_features(model, seqs[a:b], n_top, pad_id, batch_tokens))
        computed += b - a
    log.info(
        "frozen-layer cache %s at %s: %d of %d chunks on disk before, %d of %d sequences computed",
        status,
        folder,
        len(store.chunks) - len(missing),
        len(store.chunks),
        computed,
        len(seqs),
    )
    return store, computed
