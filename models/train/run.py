"""`train()`, the recipe: load the model and data, apply the method, build batches, loop, evaluate, save."""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.backbone import auto_dtype, default_home, sha256_file
from models.checkpoints.files import make_readable
from models.data import ReadStats, read_files, split_dev
from models.evaluate import EncodedExample, encode_examples
from models.formatting import Formatter
from models.reward_model import RewardModel
from models.train.batches import make_batches
from models.train.card import normalization, write_card
from models.train.checkpoint import remove_checkpoint
from models.train.config import TrainConfig, check_config, config_from_args
from models.train.distributed import Distributed, dist_info
from models.train.loop import Loop, LoopResult
from models.train.methods import (
    add_head_dropout,
    apply_method,
    merge_method,
    transformer_layers,
    use_frozen_cache,
)
from models.train.scorer import Scorer, evaluate_dev
from models.trained import save_trained, trained_tensors

log = logging.getLogger(__name__)

TRAINED_DIR = "trained"  # lora / top-n: only what training changed (see models/trained.py)


@dataclass
class TrainData:
    train: list[EncodedExample]
    dev: list[EncodedExample]
    read_stats: dict[str, ReadStats]

    @property
    def pairs(self) -> int:
        return sum(len(g.example.pairs()) for g in self.train)


def load_model(cfg: TrainConfig) -> tuple[RewardModel, Any]:
    """(model in float32, tokenizer): a fresh head on the backbone, or --init-model's reward model."""
    if cfg.init_model:
        model, tok = RewardModel.load(cfg.init_model, dtype="float32", format=cfg.model_format)
    else:
        model, tok = RewardModel.from_backbone(cfg.backbone, dtype="float32", max_length=cfg.max_length, seed=cfg.seed)
    model.config.max_length = cfg.max_length
    return model, tok


def load_data(cfg: TrainConfig, formatter: Formatter) -> TrainData:
    """Read, split (deterministic hash split), sample (--train-max, --dev-max) and tokenize."""
    examples, read_stats = read_files(cfg.data, cfg.format, skip_bad=cfg.skip_bad)
    if not examples:
        raise ValueError("no usable comparisons in " + ", ".join(cfg.data))
    train_ex, dev_ex = split_dev(examples, cfg.dev_fraction, cfg.seed)
    if not train_ex:
        raise ValueError("the dev split took every prompt; lower --dev-fraction")
    if cfg.train_max and len(train_ex) > cfg.train_max:
        keep = sorted(random.Random(cfg.seed).sample(range(len(train_ex)), cfg.train_max))
        train_ex = [train_ex[i] for i in keep]
    dev_ex = spread_take(dev_ex, cfg.dev_max) if cfg.dev_max else dev_ex
    return TrainData(encode_examples(formatter, train_ex), encode_examples(formatter, dev_ex), read_stats)


def spread_take(examples: Sequence[Any], n: int) -> list[Any]:
    """The first `n` of `examples` taken in turn from each subset (in file order within a subset), so a
    small fixed dev sample covers every subset instead of the first file alone; order kept as read."""
    by_subset: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_subset.setdefault(ex.subset, []).append(i)
    queues = [list(reversed(v)) for v in by_subset.values()]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return [examples[i] for i in sorted(picked)]


def balanced_order(groups: Sequence[EncodedExample], seed: int) -> list[int]:
    """Indices into `groups` in which every subset (HH's four, OASST, ...) appears as often as the
    largest one: smaller subsets' prompts repeat whole, then a seeded sample makes up the rest."""
    by_subset: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_subset.setdefault(g.example.subset, []).append(i)
    most = max(len(v) for v in by_subset.values())
    rng = random.Random(seed)
    out: list[int] = []
    for name in sorted(by_subset):
        idx = by_subset[name]
        out += idx * (most // len(idx)) + sorted(rng.sample(idx, most % len(idx)))
    return out


def build_batches(cfg: TrainConfig, groups: Sequence[EncodedExample]) -> list[list[int]]:
    """Micro-batches of group indices under the token budget (with --balance-subsets over the
    balanced order, so a repeated prompt is a repeated index and reuses its cached states)."""
    if not cfg.balance_subsets:
        return make_batches(groups, cfg.batch_tokens)
    order = balanced_order(groups, cfg.seed)
    log.info("balanced subsets: %d prompts become %d per epoch", len(groups), len(order))
    return [[order[k] for k in b] for b in make_batches([groups[i] for i in order], cfg.batch_tokens)]


def check_distributed(cfg: TrainConfig, world: int) -> None:
    """Refuse what does not combine with several processes (`world`, torchrun's) or with --sharding
    fsdp, saying why and what to use. Runs before any process group is joined."""
    fsdp = cfg.sharding == "fsdp"
    if world == 1 and not fsdp:
        return
    how = "--sharding fsdp" if fsdp else f"DDP on {world} processes"
    if cfg.early_stopping_patience:
        why = (
            "under FSDP each rank holds only shards of the parameters, and early stopping keeps the best "
            "weights as whole tensors on one process"
            if fsdp
            else "under DDP only rank 0 evaluates, so the other ranks cannot learn when to stop or which "
            "weights to keep"
        )
        raise ValueError(f"--early-stopping-patience does not combine with {how}: {why}; run it on one process")
    if cfg.prefix_sharing == "on":
        raise ValueError(
            f"--prefix-sharing on does not combine with {how}: the shared-prefix pass runs the layers outside "
            "the DDP/FSDP wrapper, so its gradients would not be reduced over ranks; use --prefix-sharing off"
        )
    if cfg.cache_frozen == "on":
        raise ValueError(
            f"--cache-frozen on does not combine with {how}: the cached path runs the top layers outside the "
            "DDP/FSDP wrapper, so its gradients would not be reduced over ranks; use --cache-frozen off (or auto)"
        )


def frozen_cache_off_reason(cfg: TrainConfig, world: int, fsdp: bool) -> str | None:
    """Why `--cache-frozen auto` leaves the frozen-layer cache off for this run (one INFO line), or None
    when it is not a top-n run under DDP/FSDP (one process decides by the model alone)."""
    if cfg.method != "top-n" or cfg.cache_frozen != "auto" or not (world > 1 or fsdp):
        return None
    how = "--sharding fsdp" if fsdp else f"DDP on {world} processes"
    return (
        f"--cache-frozen auto: the frozen-layer cache is off under {how} (the cached path runs the top layers "
        "outside the DDP/FSDP wrapper, so their gradients would not be reduced over ranks); every step runs "
        "the whole model"
    )


def make_scorer(cfg: TrainConfig, model: RewardModel, pad_id: int, dist: Distributed, data: TrainData) -> Scorer:
    """The scorer for this run: through DDP or FSDP with a process group, with shared prompt prefixes
    when asked, and with the frozen bottom layers computed once (or read from --cache-dir) when the
    method allows it. Under FSDP with bf16 the sharding casts the parameters (MixedPrecisionPolicy),
    not autocast."""
    amp_name = auto_dtype(dist.device) if cfg.dtype == "auto" else cfg.dtype
    amp = torch.bfloat16 if amp_name == "bfloat16" else None
    fwd = dist.wrap(model, transformer_layers(model.body), model.head, mixed_bf16=amp is not None)
    scorer = Scorer(fwd, model, pad_id, dist.device, None if dist.fsdp else amp)
    scorer.one_pass = dist.collective
    scorer.prefix_sharing = cfg.prefix_sharing == "on"
    off = frozen_cache_off_reason(cfg, dist.world, dist.fsdp)
    if off and dist.is_main:
        log.info("%s", off)
    if use_frozen_cache(cfg, model, dist.world if not dist.fsdp else 0):
        from models.frozen_cache import frozen_fingerprint

        t_cache = time.time()
        cache_dir = None if cfg.cache_dir == "none" else Path(cfg.cache_dir or default_home() / "frozen-cache")
        key = (
            {
                "frozen_weights": frozen_fingerprint(model, cfg.top_n),
                "data": sorted(sha256_file(Path(p)) for p in cfg.data),
                "max_length": cfg.max_length,
            }
            if cache_dir
            else None
        )
        store = cfg.cache_dtype if cfg.cache_dtype != "auto" else amp_name
        computed = scorer.build_cache(
            [data.train, data.dev],
            cfg.top_n,
            cfg.batch_tokens * 2,
            cache_dir=cache_dir,
            key=key,
            dtype=getattr(torch, store),
        )
        log.info(
            "frozen bottom layers' output for %d sequences ready in %.0f s (%d computed, stored as %s)",
            sum(len(g.seqs) for g in data.train) + sum(len(g.seqs) for g in data.dev),
            time.time() - t_cache,
            computed,
            store,
        )
    return scorer


def gather_full_model(cfg: TrainConfig, sharded: RewardModel, dist: Distributed) -> RewardModel | None:
    """Under FSDP, on every rank: the full state dict gathered on rank 0 (in CPU memory), loaded there
    into a plain model of the same method; None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    plain, _tok = load_model(cfg)
    apply_method(plain, cfg)
    plain.load_state_dict(sd, strict=True)
    plain.config = sharded.config
    return plain.to(dist.device)


def train(cfg: TrainConfig) -> Path:
    check_config(cfg)
    check_distributed(cfg, dist_info()[1])
    dist = Distributed.start(cfg.device, cfg.sharding)
    try:
        return _train(cfg, dist)
    finally:
        dist.close()  # also after an error, so no process group outlives the run


def _train(cfg: TrainConfig, dist: Distributed) -> Path:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    t_start = time.time()

    model, tok = load_model(cfg)
    data = load_data(cfg, model.formatter(tok))
    if dist.is_main:
        log.info(
            "train: %d prompts, %d pairs, %d responses; dev: %d prompts",
            len(data.train),
            data.pairs,
            sum(len(g.seqs) for g in data.train),
            len(data.dev),
        )
    apply_method(model, cfg)
    if cfg.gradient_checkpointing:
        model.body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(dist.device)
    model.train()
    head_dropout = add_head_dropout(model, cfg.head_dropout)
    # The trainable tensors as they start (rank 0, before sharding), to count what training changed.
    before = (
        {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        if dist.is_main
        else {}
    )
    batches = build_batches(cfg, data.train)  # ONE sequence for every world size; the loop splits each step
    scorer = make_scorer(cfg, model, tok.pad_token_id, dist, data)
    loop = Loop(cfg, model, scorer, (data.train, data.dev), batches, dist)
    if cfg.resume:
        loop.resume(out)

    result = loop.run(out)
    seconds = round(time.time() - t_start, 1)
    if result.halted:
        dist.leave()
        return out
    memory = loop.memory_all_ranks()
    trainable_parameters = sum(p.numel() for p in loop.trainable)
    if dist.fsdp:
        full = gather_full_model(cfg, model, dist)
    if not dist.end_training():
        return out
    if head_dropout is not None:
        head_dropout.remove()
    if dist.fsdp:
        assert full is not None
        model = full
        scorer = Scorer(model, model, tok.pad_token_id, dist.device, scorer.amp)
    scorer.fwd = model  # no collectives from here on: only rank 0 evaluates and saves
    scorer.one_pass = False
    changed = sum(int(not torch.equal(before[n], p.detach().cpu())) for n, p in model.named_parameters() if n in before)
    record: dict[str, Any] = {
        "trainable_parameters": trainable_parameters,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(before),
        "seconds": seconds,
        "world_size": dist.world,
        "sharding": cfg.sharding if dist.collective else "none",
        "memory_per_rank": memory,
    }
    if result.early_stopping is not None:
        record["early_stopping"] = result.early_stopping
    if loop.time_limited:
        record["time_limited"] = {"seconds": cfg.time_limit, "step": result.steps, "of_steps": loop.total_steps}
    finish(cfg, model, tok, scorer, data, result, record)
    remove_checkpoint(out)
    return out


def finish(
    cfg: TrainConfig,
    model: RewardModel,
    tok: Any,
    scorer: Scorer,
    data: TrainData,
    result: LoopResult,
    record: dict[str, Any],
) -> None:
    """Evaluate on dev, measure the normalization, and write the model directory, its card and (lora /
    top-n) the trained tensors alone."""
    out = Path(cfg.out)
    shipped = trained_tensors(model, cfg.method) if cfg.method != "full" else None
    merge_method(model, cfg)
    model.eval()
    dev_metrics = evaluate_dev(model, data.dev, scorer, cfg.batch_tokens) if data.dev else {}
    model.config.normalization = normalization(scorer, data.train, cfg.norm_samples, cfg.seed)
    model.config.training = {
        "recipe": asdict(cfg),
        "dev_fraction": cfg.dev_fraction,
        "seed": cfg.seed,
        "steps": result.steps,
        "train_prompts": len(data.train),
        "train_pairs": data.pairs,
        "dev_prompts": len(data.dev),
        **record,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "dev": dev_metrics,
        "data": {p: asdict(s) | {"bad": s.bad[:5]} for p, s in data.read_stats.items()},
    }
    model.to("cpu")
    model.save(out, tok)
    write_card(out, model.config.training, result.history)
    if shipped is not None:
        save_trained(
            *shipped, model.config, out / TRAINED_DIR, method=cfg.method, dtype=getattr(torch, cfg.trained_dtype)
        )
    make_readable(out)  # everything written above (trained/ shards: safetensors writes 0600), for other uids
    log.info("wrote %s (dev accuracy %s)", out, dev_metrics.get("accuracy"))


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    train(cfg)
    print(cfg.out)
    return 0
