"""The canonical forward: one sequence's reward is the same bits whatever else is in the pass.

Why a plain batched forward is not: a GEMM's blocking (and so its rounding) depends on how many rows
it is called with, attention over a padded length sums over a different number of keys, and a
reduction over few rows may be split across threads. Here (the batch-invariant design of vLLM's and
SGLang's deterministic modes):

- **Packing.** The real tokens of every sequence of a pass are laid end to end, `input_ids (1, N)`,
  with `position_ids` restarting per sequence; no padding, no attention mask. The pack is filled up to
  a multiple of `tile_rows` with a filler segment of its own, so every tensor of the pass has a row
  count that is a multiple of the tile (element-wise kernels then split work across threads at row
  boundaries, and reductions always see many rows).
- **Fixed-shape linear tiles.** Every `nn.Linear` (and GPT-2's `Conv1D`) of the body, and the reward
  head, runs on the flattened tokens in tiles of exactly `tile_rows` rows: a row's product never
  depends on how many rows the pass has.
- **Per-segment attention** (varlen), registered with transformers' `AttentionInterface` under
  `ATTENTION`, so each family's own modeling code (rotary or absolute positions, GQA, sliding
  windows, Gemma2's logit soft-capping, its scaling) runs unchanged. A segment's queries meet only its
  own keys (and its prompt's): one matmul-softmax-matmul of a shape that depends on that sequence
  alone. The same code runs for every length.
- **The prompt/answer split is part of the definition.** A sequence with a prompt boundary
  (`prompt_len`, from the formatter) is two segments: the prompt, computed on its own (causal), and
  the answer, whose queries attend to [prompt keys/values ; its own] with the causal offset and
  positions continuing the prompt. Identical prompts in one pass are computed once. A (prompt,
  answer) pair scored alone, or with K answers to the same prompt, or among strangers, therefore
  gives the same bits.

The reward is read at the last token of each sequence (the shared rule: the formatter's ids end at
the token whose hidden state the head reads).

The guarantee holds for one machine kind, dtype and thread count: bits differ between CPU kinds
(AVX2, AVX512, AMX) and dtypes. Inference only (no dropout, no gradients needed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.batching import PromptSplit, packed_cost, prompt_len_of

__all__ = ["PromptSplit", "canonical_rewards", "pack", "packed_cost", "prompt_len_of", "supports"]

ATTENTION = "rmserve_canonical"  # the name registered with transformers' AttentionInterface
# Rows per linear tile: 128 rows were measured bit-identical whatever M on a Sapphire Rapids CPU in bf16
# (issue #24). Not tuned here: this AVX2 CPU showed no M-dependence in F.linear at all (fp32 and bf16, M up
# to 4096), and its timings were dominated by other jobs on the machine.
DEFAULT_TILE_ROWS = 128

# model_type of every family the canonical forward is tested on (tests/models/test_canonical.py);
# `supports` says no for any other, and the runtime then falls back to the padded forward.
COVERED = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt_neox", "gpt2"})


@dataclass(frozen=True)
class Segment:
    """One run of packed rows: `start`, `length` (rows), and `context`, the index of the prompt segment
    whose keys/values come before its own (None: it attends to itself alone)."""

    start: int
    length: int
    context: int | None = None


@dataclass
class Packed:
    """A pass's tokens packed end to end.

    input_ids, position_ids: (1, N) long, N a multiple of the tile. segments: every segment, the filler
    included. last: (B,) long, the row of each sequence's last token (in input order).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: list[Segment]
    last: torch.Tensor
    real_tokens: int
    _masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict)

    def mask(self, i: int, window: int | None, device: torch.device) -> torch.Tensor | None:
        """Allowed (query, key) pairs of segment `i`, (L, S) bool, with the causal offset of its prompt
        and a sliding window (a key is seen when query position - key position < window); None when
        nothing is hidden (a single query row without a window)."""
        k = (i, window)
        if k not in self._masks:
            seg = self.segments[i]
            off = self.segments[seg.context].length if seg.context is not None else 0
            q = torch.arange(seg.length, device=device)[:, None] + off  # (L, 1) query positions
            kv = torch.arange(off + seg.length, device=device)[None, :]  # (1, S) key positions
            allowed = kv <= q
            if window is not None:
                allowed = allowed & (q - kv < window)
            self._masks[k] = allowed
        return self._masks[k]


def pack(seqs: Sequence[Sequence[int]], tile_rows: int, pad_id: int, device: torch.device | str = "cpu") -> Packed:
    """Pack `seqs` (each with its `prompt_len`, if any) into one row of tokens; identical prompts are
    laid out once. Raises ValueError naming an empty sequence."""
    ids: list[int] = []
    pos: list[int] = []
    segments: list[Segment] = []
    prompts: dict[tuple[int, ...], int] = {}
    last: list[int] = []
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"sequence {i} is empty")
        p = prompt_len_of(s)
        context = None
        if p:
            key = tuple(s[:p])
            context = prompts.get(key)
            if context is None:
                context = prompts[key] = len(segments)
                segments.append(Segment(len(ids), p))
                ids.extend(key)
                pos.extend(range(p))
        segments.append(Segment(len(ids), len(s) - p, context))
        ids.extend(s[p:])
        pos.extend(range(p, len(s)))
        last.append(len(ids) - 1)
    real = len(ids)
    fill = (-real) % tile_rows
    if fill:  # a filler segment of its own, so that the pass is whole tiles
        segments.append(Segment(real, fill))
        ids.extend([pad_id] * fill)
        pos.extend(range(fill))
    return Packed(
        torch.tensor([ids], dtype=torch.long, device=device),
        torch.tensor([pos], dtype=torch.long, device=device),
        segments,
        torch.tensor(last, dtype=torch.long, device=device),
        real,
    )


def canonical_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    rmserve_packed: Packed | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Per-segment attention for a packed pass (transformers' attention function signature).

    query (1, Hq, N, D), key and value (1, Hkv, N, D) -> (1, N, Hq, D). Each segment's queries attend
    to its prompt's keys (if any) then its own, causally, within `sliding_window`; scores are scaled
    by `scaling` (default D^-0.5), soft-capped as `softcap * tanh(s / softcap)` when given, and
    softmaxed in float32, as transformers' eager attention does.
    """
    if rmserve_packed is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION!r} needs the packed pass's segments: "
            "run the model through models.canonical.canonical_rewards"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a packed pass has batch size 1, got query of shape {tuple(query.shape)}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    hq, hkv = query.shape[1], key.shape[1]
    q_all, k_all, v_all = query[0], key[0], value[0]  # (H, N, D)
    out = torch.empty_like(q_all)  # (Hq, N, D)
    segs = rmserve_packed.segments
    for i, seg in enumerate(segs):
        rows = slice(seg.start, seg.start + seg.length)
        q = q_all[:, rows]  # (Hq, L, D)
        if seg.context is None:
            k, v = k_all[:, rows], v_all[:, rows]  # (Hkv, S, D)
        else:
            c = segs[seg.context]
            crow = slice(c.start, c.start + c.length)
            k = torch.cat([k_all[:, crow], k_all[:, rows]], dim=1)
            v = torch.cat([v_all[:, crow], v_all[:, rows]], dim=1)
        if hkv != hq:
            k = k.repeat_interleave(hq // hkv, dim=0)
            v = v.repeat_interleave(hq // hkv, dim=0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (Hq, L, S)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = rmserve_packed.mask(i, sliding_window, query.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[:, rows] = torch.matmul(probs, v)
    return out.transpose(0, 1).unsqueeze(0), None  # (1, N, Hq, D)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, canonical_attention)


_register()


def _tiled_forward(forward: Any, rows: int, x: torch.Tensor) -> torch.Tensor:
    """`forward` (a row-wise linear) applied to `x` (..., in) in tiles of exactly `rows` rows. (..., out)"""
    flat = x.reshape(-1, x.shape[-1])  # (M, in)
    m = flat.shape[0]
    fill = (-m) % rows
    if fill:
        flat = F.pad(flat, (0, 0, 0, fill))
    out = torch.cat([forward(flat[r : r + rows]) for r in range(0, m + fill, rows)])  # (M + fill, out)
    return out[:m].reshape(*x.shape[:-1], out.shape[-1])


def _row_wise_linears(module: nn.Module) -> list[nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return [m for m in module.modules() if isinstance(m, nn.Linear | Conv1D)]


@contextlib.contextmanager
def canonical_mode(body: Any, tile_rows: int) -> Iterator[None]:
    """Within the block, `body` runs with per-segment attention and every linear layer in tiles of
    `tile_rows` rows; both are restored after (the body is shared with the padded forward)."""
    base = body.get_base_model() if hasattr(body, "get_base_model") else body  # a peft wrapper's model
    config = base.config
    before = config._attn_implementation
    patched = _row_wise_linears(body)
    for m in patched:
        m.forward = _bind(m.forward, tile_rows)
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        for m in patched:
            del m.forward  # back to the class's forward


def _bind(forward: Any, rows: int) -> Any:
    return lambda x: _tiled_forward(forward, rows, x)


def supports(body: Any) -> bool:
    """Whether `body`'s family is one the canonical forward covers (and is tested on)."""
    base = body.get_base_model() if hasattr(body, "get_base_model") else body
    return str(getattr(base.config, "model_type", "")) in COVERED


def canonical_hidden(
    body: Any, seqs: Sequence[Sequence[int]], *, tile_rows: int = DEFAULT_TILE_ROWS, pad_id: int = 0
) -> torch.Tensor:
    """(B, H) hidden state at each sequence's last token, from one packed pass in canonical mode."""
    dev = next(body.parameters()).device
    packed = pack(seqs, tile_rows, pad_id, dev)
    with canonical_mode(body, tile_rows):
        out = body(
            input_ids=packed.input_ids,
            position_ids=packed.position_ids,
            use_cache=False,
            rmserve_packed=packed,
        )
    h = out.last_hidden_state[0]  # (N, H)
    return h[packed.last]  # (B, H)


def canonical_rewards(
    body: Any,
    head: nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    tile_rows: int = DEFAULT_TILE_ROWS,
    pad_id: int = 0,
) -> torch.Tensor:
    """(B,) float32 rewards of `seqs` (token id lists, each a `PromptSplit` or plain) in one packed
    pass: the head (float32) reads each sequence's last token, in tiles of `tile_rows` rows."""
    if not seqs:
        return torch.zeros(0)
    h = canonical_hidden(body, seqs, tile_rows=tile_rows, pad_id=pad_id).float()  # (B, H)
    return _tiled_forward(head, tile_rows, h).squeeze(-1)  # (B,)
