"""The offline trainer (`rmserve train`): ranked human comparisons in, a reward model directory out.

InstructGPT batching: every prompt with its K ranked responses is one batch element; each response
is forwarded once and all K-choose-2 pairs of the prompt enter the loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.backbone import auto_dtype
from models.data import FORMATS, read_files, split_dev
from models.evaluate import EncodedExample, encode_examples, metrics_from_scores, score_encoded
from models.losses import centering_loss, listwise_loss, pairwise_loss
from models.reward_model import RewardModel, collate
from models.trained import save_trained, trained_tensors

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".checkpoint"
TRAINED_DIR = "trained"  # lora / top-n: only what training changed (see models/trained.py)


@dataclass
class TrainConfig:
    """Every training knob, with its reason; recorded in the model card."""

    backbone: str = ""  # HF folder or .gguf file of the SFT model
    data: list[str] = field(default_factory=list)  # comparison files
    out: str = ""  # model directory to write
    format: str | None = None  # data format; None = detect per file
    init_model: str | None = None  # start from this reward model directory instead of a fresh head
    method: str = "top-n"  # full | top-n | lora
    top_n: int = 4  # with top-n: how many of the last transformer layers train (plus final norm and head)
    lora_rank: int = 16  # with lora: adapter rank
    lora_alpha: int = 32  # with lora: adapter scale numerator
    loss: str = "pairwise"  # pairwise (InstructGPT) | listwise (Plackett-Luce)
    center_coef: float = 0.0  # reward-centering term coefficient (coef * mean(r^2))
    max_length: int = 512  # tokens per response sequence, prompt included (oldest prompt cut first)
    max_steps: int = 0  # optimizer steps (0 = as many as the epochs give)
    epochs: float = 1.0  # passes over the training data
    lr: float = 5e-5  # peak learning rate (head and body)
    head_lr: float | None = None  # head learning rate (default: lr x 10)
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 10%
    batch_tokens: int = 4096  # padded tokens (longest x count) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    dev_fraction: float = 0.05  # share of prompts held out for dev (deterministic hash split)
    dev_max: int = 0  # evaluate only the first N dev examples, during training and at the end (0 = all)
    train_max: int = 0  # keep a seeded sample of this many training examples (0 = all), for CPU budgets
    eval_every: int = 0  # dev evaluation every N steps (0 = only at the end)
    save_every: int = 50  # checkpoint every N steps (for --resume)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "auto"  # autocast dtype for forward/backward: bfloat16 | float32 | auto (bf16 where fast)
    resume: bool = False  # continue from out/.checkpoint after a kill
    skip_bad: bool = False  # skip malformed lines (counted) instead of stopping
    norm_samples: int = 512  # training responses scored for the normalization mean/std
    cache_frozen: str = "auto"  # top-n: compute the frozen bottom layers once per sequence (auto | on | off)
    prefix_sharing: str = "off"  # run each prompt once for all its responses, gradients through it (on | off)
    halt_after: int = 0  # testing aid: stop abruptly after N steps, like a kill (no final model)
    trained_dtype: str = "bfloat16"  # lora / top-n: dtype of OUT/trained/, the tensors training changed


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--backbone", required=False, default=None, help="SFT model: HF folder or .gguf file")
    p.add_argument("--init-model", default=None, help="start from this reward model directory")
    p.add_argument("--data", nargs="+", required=True, help="comparison files (JSONL, .jsonl.gz)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--format", choices=FORMATS, default=None, help="data format (default: detected per file)")
    p.add_argument("--method", choices=["full", "top-n", "lora"], default=d.method)
    p.add_argument("--top-n", type=int, default=d.top_n, help="layers trained with --method top-n")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--loss", choices=["pairwise", "listwise"], default=d.loss)
    p.add_argument("--center-coef", type=float, default=d.center_coef, help="reward-centering coefficient")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="0 = as many as --epochs give")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-lr", type=float, default=None, help="default: 10 x --lr")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="warmup fraction of steps")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="padded tokens per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--dev-fraction", type=float, default=d.dev_fraction)
    p.add_argument("--dev-max", type=int, default=d.dev_max, help="evaluate only the first N dev examples (0 = all)")
    p.add_argument("--train-max", type=int, default=d.train_max, help="seeded sample of training examples (0 = all)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default=d.dtype,
        help="auto: bf16 on GPUs and CPUs with AMX/AVX512-BF16, else fp32",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/.checkpoint")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines")
    p.add_argument("--norm-samples", type=int, default=d.norm_samples)
    p.add_argument(
        "--cache-frozen",
        choices=["auto", "on", "off"],
        default=d.cache_frozen,
        help="top-n: run the frozen bottom layers once per sequence and train on cached states "
        "(auto: on for Llama-family bodies on one process)",
    )
    p.add_argument(
        "--prefix-sharing",
        choices=["on", "off"],
        default=d.prefix_sharing,
        help="run each prompt once (KV cache) for all its responses; not with the frozen cache",
    )
    p.add_argument(
        "--trained-dtype",
        choices=["bfloat16", "float32"],
        default=d.trained_dtype,
        help="lora / top-n: dtype of OUT/trained/ (only the tensors training changed, for shipping)",
    )
    p.add_argument("--halt-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if not args.backbone and not args.init_model:
        raise ValueError("give --backbone (an SFT model) or --init-model (a reward model directory)")
    kw["backbone"] = args.backbone or ""
    return TrainConfig(**kw)


# -- fine-tuning methods ------------------------------------------------------------------------------
def transformer_layers(body: nn.Module) -> nn.ModuleList:
    for name in ("layers", "h", "block", "blocks"):
        mod = getattr(body, name, None)
        if isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError(f"cannot find the transformer layers of {type(body).__name__}")


def final_norm(body: nn.Module) -> nn.Module | None:
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        mod = getattr(body, name, None)
        if isinstance(mod, nn.Module):
            return mod
    return None


def apply_method(model: RewardModel, cfg: TrainConfig) -> None:
    """Choose what trains: everything, the top N layers (+ final norm), or LoRA adapters. The head always."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "top-n":
        layers = transformer_layers(model.body)
        if not 0 <= cfg.top_n <= len(layers):
            raise ValueError(f"--top-n is {cfg.top_n}; the backbone has {len(layers)} layers")
        model.body.requires_grad_(False)
        for layer in list(layers)[len(layers) - cfg.top_n :]:
            layer.requires_grad_(True)
        norm = final_norm(model.body)
        if norm is not None and cfg.top_n > 0:
            norm.requires_grad_(True)
    elif cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        model.body = get_peft_model(model.body, lcfg)
    else:
        raise ValueError(f"--method {cfg.method!r} is unknown; use full, top-n or lora")
    model.head.requires_grad_(True)
    # Pairwise and listwise losses see only reward differences: the bias gets no gradient from them.
    model.head.bias.requires_grad_(cfg.center_coef > 0)


def use_frozen_cache(cfg: TrainConfig, model: RewardModel, world: int) -> bool:
    from models.frozen_cache import supports_cache

    if cfg.method != "top-n" or cfg.cache_frozen == "off":
        return False
    ok = supports_cache(model.body) and world == 1 and 0 < cfg.top_n < len(transformer_layers(model.body))
    if cfg.cache_frozen == "on" and not ok:
        raise ValueError(
            "--cache-frozen on needs --method top-n with 0 < N < layers, a Llama-family body and one process"
        )
    return ok


def merge_method(model: Any, cfg: TrainConfig) -> None:
    if cfg.method == "lora":
        model.body = model.body.merge_and_unload()


# -- batching -----------------------------------------------------------------------------------------
@dataclass
class Batch:
    seqs: list[list[int]]
    better: list[int]
    worse: list[int]
    pair_group: list[int]
    margin: list[float]
    ranks: list[int]
    resp_group: list[int]
    keys: list[tuple[int, int]]  # (group index, response index) of each sequence

    @property
    def padded_tokens(self) -> int:
        return max(len(s) for s in self.seqs) * len(self.seqs)

    @property
    def real_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


def make_batches(groups: Sequence[EncodedExample], batch_tokens: int) -> list[list[int]]:
    """Group indices packed by length: padded cost (longest x sequences) stays under `batch_tokens`
    (a group bigger than the budget goes alone)."""
    order = sorted(range(len(groups)), key=lambda i: max(len(s) for s in groups[i].seqs))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_len = cur_n = 0
    for i in order:
        g = groups[i]
        longest = max(cur_len, max(len(s) for s in g.seqs))
        if cur and longest * (cur_n + len(g.seqs)) > batch_tokens:
            batches.append(cur)
            cur, cur_n, longest = [], 0, max(len(s) for s in g.seqs)
        cur.append(i)
        cur_n += len(g.seqs)
        cur_len = longest
    if cur:
        batches.append(cur)
    return batches


def build_batch(groups: Sequence[EncodedExample], idx: Sequence[int]) -> Batch:
    b = Batch([], [], [], [], [], [], [], [])
    for gi, i in enumerate(idx):
        g = groups[i]
        base = len(b.seqs)
        b.seqs.extend(g.seqs)
        b.keys.extend((i, j) for j in range(len(g.seqs)))
        b.ranks.extend(g.example.ranks)
        b.resp_group.extend([gi] * len(g.seqs))
        for w, lo in g.example.pairs():
            b.better.append(base + w)
            b.worse.append(base + lo)
            b.pair_group.append(gi)
            b.margin.append(g.example.margin)
    return b


def micro_batch_stream(n_batches: int, epochs: float, seed: int) -> Iterator[tuple[int, int]]:
    """(epoch, batch index) in training order: each epoch a seeded shuffle; a fractional last epoch."""
    total = math.ceil(n_batches * epochs)
    k = 0
    epoch = 0
    while k < total:
        order = list(range(n_batches))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for b in order:
            if k >= total:
                return
            yield epoch, b
            k += 1
        epoch += 1


def lr_lambda(total_steps: int, warmup_frac: float) -> Any:
    warm = max(1, int(total_steps * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


# -- distributed (torchrun) ---------------------------------------------------------------------------
def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


# -- checkpoints --------------------------------------------------------------------------------------
def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    step: int,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
) -> None:
    ck = out / CHECKPOINT_DIR
    tmp = out / (CHECKPOINT_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history, "config": asdict(cfg)}))
    if ck.exists():
        shutil.rmtree(ck)
    os.replace(tmp, ck)


def load_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> tuple[int, list[dict[str, Any]]]:
    ck = out / CHECKPOINT_DIR
    if not (ck / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ck}")
    state = json.loads((ck / "state.json").read_text())
    trained = load_file(str(ck / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in trained if n not in params]
    if missing:
        raise ValueError(f"--resume: checkpoint parameters {missing[:3]} do not exist in this model (other --method?)")
    with torch.no_grad():
        for n, t in trained.items():
            params[n].copy_(t)
    blob = torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu")
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(load_file(str(ck / "rng.safetensors"))["cpu"])
    return int(state["step"]), list(state["history"])


# -- the loop -----------------------------------------------------------------------------------------
class Scorer:
    """Batch -> rewards, either through the whole model or from cached frozen-layer states."""

    def __init__(
        self, fwd: nn.Module, model: RewardModel, pad_id: int, device: torch.device, amp: torch.dtype | None
    ) -> None:
        self.fwd, self.model, self.pad_id, self.device, self.amp = fwd, model, pad_id, device, amp
        self.cache: dict[int, list[list[torch.Tensor]]] = {}  # id(groups list) -> per group, per response
        self.n_top = 0
        self.prefix_sharing = False  # run each prompt once for all its responses (KV cache, gradients flow)
        self.shared_sequences = 0  # how many sequences took the shared-prefix path

    def build_cache(self, groups_lists: Sequence[Sequence[EncodedExample]], n_top: int, batch_tokens: int) -> None:
        from models.frozen_cache import frozen_features

        self.n_top = n_top
        for groups in groups_lists:
            if id(groups) in self.cache:
                continue
            flat = [s for g in groups for s in g.seqs]
            feats = frozen_features(self.model, flat, n_top, self.pad_id, batch_tokens)
            per_group, k = [], 0
            for g in groups:
                per_group.append(feats[k : k + len(g.seqs)])
                k += len(g.seqs)
            self.cache[id(groups)] = per_group

    def rewards(self, groups: Sequence[EncodedExample], batch: Batch) -> torch.Tensor:
        if id(groups) in self.cache:
            from models.frozen_cache import rewards_from_features

            feats = self.cache[id(groups)]
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                return rewards_from_features(self.model, [feats[g][j] for g, j in batch.keys], self.n_top).float()
        if self.prefix_sharing:
            return self._shared_rewards(batch)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self._plain(batch.seqs)

    def _plain(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N,) rewards through the whole model. On one process the sequences run in length-sorted
        chunks whose padding stays within 1.3x of their real tokens; under DDP in one pass (its
        reducer expects one forward per backward)."""
        from models.prefix import length_chunks

        chunks = length_chunks([len(s) for s in seqs]) if self.fwd is self.model else [list(range(len(seqs)))]
        pieces, order = [], []
        for chunk in chunks:
            ids, mask = collate([seqs[i] for i in chunk], self.pad_id, "right", self.device)
            pieces.append(self.fwd(ids, mask).float())
            order.extend(chunk)
        vals = torch.cat(pieces)
        return vals[torch.argsort(torch.tensor(order, device=vals.device))]

    def _shared_rewards(self, batch: Batch) -> torch.Tensor:
        """Sequences of the batch that share a token prefix (a prompt's K responses) run it once, their
        own tokens on its KV cache; the others go through the plain batched pass."""
        from models.prefix import group_shared_prefixes, grouped_prefix_rewards

        shared, plain = group_shared_prefixes(batch.seqs, min_prefix=16, min_saved=16)
        order = [i for _, idx in shared for i in idx]
        self.shared_sequences += len(order)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            parts = [(batch.seqs[idx[0]][:plen], [batch.seqs[i][plen:] for i in idx]) for plen, idx in shared]
            pieces = [r.float() for r in grouped_prefix_rewards(self.model, parts)]
            if plain:
                pieces.append(self._plain([batch.seqs[p] for p in plain]))
                order.extend(plain)
        vals = torch.cat(pieces)  # (N,) in `order`
        inverse = torch.argsort(torch.tensor(order, device=vals.device))
        return vals[inverse]


def _loss(
    rewards: torch.Tensor, batch: Batch, cfg: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.loss == "pairwise":
        loss, acc = pairwise_loss(
            rewards,
            torch.tensor(batch.better, device=device),
            torch.tensor(batch.worse, device=device),
            torch.tensor(batch.pair_group, device=device),
            torch.tensor(batch.margin, device=device, dtype=torch.float32),
        )
    else:
        loss = listwise_loss(
            rewards, torch.tensor(batch.ranks, device=device), torch.tensor(batch.resp_group, device=device)
        )
        with torch.no_grad():
            d = rewards[batch.better] - rewards[batch.worse]
            acc = ((d > 0).float() + 0.5 * (d == 0).float()).mean()
    if cfg.center_coef:
        loss = loss + centering_loss(rewards, cfg.center_coef)
    return loss, acc


def evaluate_dev(
    model: RewardModel, dev: Sequence[EncodedExample], scorer: Scorer, batch_tokens: int
) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    if id(dev) in scorer.cache:
        per: dict[int, list[float]] = {}
        with torch.no_grad():
            for idx in make_batches(dev, batch_tokens * 2):
                b = build_batch(dev, idx)
                for (g, _j), r in zip(b.keys, scorer.rewards(dev, b).tolist(), strict=True):
                    per.setdefault(g, []).append(r)
        scores = [per[g] for g in range(len(dev))]
    else:
        scores = score_encoded(model, dev, scorer.pad_id, batch_tokens=batch_tokens * 2, autocast_dtype=scorer.amp)
    model.train(was_training)
    return metrics_from_scores([g.example for g in dev], scores)


def train(cfg: TrainConfig) -> Path:
    rank, world, local_rank = dist_info()
    is_main = rank == 0
    device = resolve_device(cfg.device, local_rank)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    t_start = time.time()

    if cfg.init_model:
        model, tok = RewardModel.load(cfg.init_model, dtype="float32")
    else:
        model, tok = RewardModel.from_backbone(cfg.backbone, dtype="float32", max_length=cfg.max_length, seed=cfg.seed)
    model.config.max_length = cfg.max_length
    formatter = model.formatter(tok)
    pad_id = tok.pad_token_id

    examples, read_stats = read_files(cfg.data, cfg.format, skip_bad=cfg.skip_bad)
    if not examples:
        raise ValueError("no usable comparisons in " + ", ".join(cfg.data))
    train_ex, dev_ex = split_dev(examples, cfg.dev_fraction, cfg.seed)
    if not train_ex:
        raise ValueError("the dev split took every prompt; lower --dev-fraction")
    if cfg.train_max and len(train_ex) > cfg.train_max:
        keep = sorted(random.Random(cfg.seed).sample(range(len(train_ex)), cfg.train_max))
        train_ex = [train_ex[i] for i in keep]
    train_groups = encode_examples(formatter, train_ex)
    dev_groups = encode_examples(formatter, dev_ex[: cfg.dev_max] if cfg.dev_max else dev_ex)
    n_pairs = sum(len(g.example.pairs()) for g in train_groups)
    if is_main:
        log.info(
            "train: %d prompts, %d pairs, %d responses; dev: %d prompts",
            len(train_groups),
            n_pairs,
            sum(len(g.seqs) for g in train_groups),
            len(dev_groups),
        )

    apply_method(model, cfg)
    model.to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in trainable if id(p) not in head_ids]
    groups_opt = [{"params": head_params, "lr": cfg.head_lr or cfg.lr * 10}]
    if body_params:
        groups_opt.append({"params": body_params, "lr": cfg.lr})
    opt = torch.optim.AdamW(groups_opt, weight_decay=cfg.weight_decay)

    batches = make_batches(train_groups, cfg.batch_tokens)
    # Every rank takes the same number of batches (DDP steps in lockstep); a remainder < world is left out.
    my_batches = batches[rank::world][: len(batches) // world] if world > 1 else batches
    steps_per_epoch = math.ceil(len(my_batches) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup))
    amp_name = auto_dtype(device) if cfg.dtype == "auto" else cfg.dtype
    amp = torch.bfloat16 if amp_name == "bfloat16" else None

    fwd: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    scorer = Scorer(fwd, model, pad_id, device, amp)
    scorer.prefix_sharing = cfg.prefix_sharing == "on" and world == 1
    if use_frozen_cache(cfg, model, world):
        t_cache = time.time()
        scorer.build_cache([train_groups, dev_groups], cfg.top_n, cfg.batch_tokens * 2)
        log.info(
            "cached the frozen bottom layers' output for %d sequences in %.0f s",
            sum(len(g.seqs) for g in train_groups) + sum(len(g.seqs) for g in dev_groups),
            time.time() - t_cache,
        )

    step = 0
    history: list[dict[str, Any]] = []
    if cfg.resume:
        step, history = load_checkpoint(out, model, opt, sched)
        log.info("resumed at step %d", step)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    stream = micro_batch_stream(len(my_batches), cfg.epochs if not cfg.max_steps else 1e9, cfg.seed)
    for _ in range(step * cfg.grad_accum):
        next(stream)

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not is_main,
        desc="train",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    tokens_seen = 0
    t_loop = time.time()
    while step < total_steps:
        opt.zero_grad(set_to_none=True)
        losses, accs = [], []
        for _ in range(cfg.grad_accum):
            try:
                _epoch, b = next(stream)
            except StopIteration:
                break
            batch = build_batch(train_groups, my_batches[b])
            loss, acc = _loss(scorer.rewards(train_groups, batch), batch, cfg, device)
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            accs.append(acc.item())
            tokens_seen += batch.real_tokens
        if not losses:
            break
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        step += 1
        rec: dict[str, Any] = {
            "step": step,
            "loss": sum(losses) / len(losses),
            "accuracy": sum(accs) / len(accs),
            "lr": sched.get_last_lr()[-1],
        }
        tps = tokens_seen / max(1e-9, time.time() - t_loop)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if is_main and cfg.eval_every and step % cfg.eval_every == 0 and dev_groups and step < total_steps:
            rec["dev"] = evaluate_dev(model, dev_groups, scorer, cfg.batch_tokens)
            log.info("step %d: dev accuracy %.4f", step, rec["dev"]["accuracy"] or 0.0)
        history.append(rec)
        if is_main and cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save_checkpoint(out, model, opt, sched, step, history, cfg)
        if cfg.halt_after and step >= cfg.halt_after:
            bar.close()
            log.warning("halting after step %d as asked (--halt-after)", step)
            return out
    bar.close()
    train_seconds = time.time() - t_start
    tokens_per_s = tokens_seen / max(1e-9, time.time() - t_loop)

    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if not is_main:
            dist.destroy_process_group()
            return out

    scorer.fwd = model  # no DDP collectives from here on: only rank 0 evaluates and saves
    changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in model.named_parameters() if n in before)
    shipped = trained_tensors(model, cfg.method) if cfg.method != "full" else None
    merge_method(model, cfg)
    model.eval()
    dev_metrics = evaluate_dev(model, dev_groups, scorer, cfg.batch_tokens) if dev_groups else {}
    model.config.normalization = _normalization(scorer, train_groups, cfg)
    model.config.training = {
        "recipe": asdict(cfg),
        "dev_fraction": cfg.dev_fraction,
        "seed": cfg.seed,
        "steps": step,
        "train_prompts": len(train_groups),
        "train_pairs": n_pairs,
        "dev_prompts": len(dev_groups),
        "trainable_parameters": n_trainable,
        "trainable_tensors_changed": changed,
        "trainable_tensors": len(before),
        "seconds": round(train_seconds, 1),
        "tokens_per_s": round(tokens_per_s, 1),
        "dev": dev_metrics,
        "data": {p: asdict(s) | {"bad": s.bad[:5]} for p, s in read_stats.items()},
    }
    model.to("cpu")
    model.save(out, tok)
    write_card(out, model.config.training, history)
    if shipped is not None:
        save_trained(
            *shipped, model.config, out / TRAINED_DIR, method=cfg.method, dtype=getattr(torch, cfg.trained_dtype)
        )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    ck = out / CHECKPOINT_DIR
    if ck.exists():
        shutil.rmtree(ck)
    log.info("wrote %s (dev accuracy %s)", out, dev_metrics.get("accuracy"))
    return out


@torch.inference_mode()
def _normalization(scorer: Scorer, groups: Sequence[EncodedExample], cfg: TrainConfig) -> dict[str, float]:
    """Mean and std of rewards over a seeded sample of training responses (for z-scores)."""
    rng = random.Random(cfg.seed)
    keys = [(g, j) for g, grp in enumerate(groups) for j in range(len(grp.seqs))]
    keys = rng.sample(keys, min(cfg.norm_samples, len(keys)))
    rewards: list[float] = []
    for start in range(0, len(keys), 32):
        chunk = keys[start : start + 32]
        b = Batch([groups[g].seqs[j] for g, j in chunk], [], [], [], [], [], [], chunk)
        rewards.extend(scorer.rewards(groups, b).tolist())
    r = torch.tensor(rewards)
    std = float(r.std()) if len(r) > 1 else 1.0
    return {"mean": float(r.mean()), "std": std if std > 1e-6 else 1.0, "samples": float(len(r))}


def write_card(out: Path, training: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """MODEL_CARD.md + metrics.json (+ training_curves.png when matplotlib is installed)."""
    metrics = {
        "dev": training.get("dev", {}),
        "training": {k: v for k, v in training.items() if k != "dev"},
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        from models.plots import training_curves

        curves = training_curves(history, out / "training_curves.png")
    except ImportError:
        curves = None
    rec = training["recipe"]
    dev = training.get("dev", {})
    lines = [
        "# Reward model card",
        "",
        f"- Backbone: `{rec.get('backbone') or rec.get('init_model')}`",
        f"- Method: {rec['method']}"
        + (f" (top {rec['top_n']} layers)" if rec["method"] == "top-n" else "")
        + (f" (rank {rec['lora_rank']})" if rec["method"] == "lora" else ""),
        f"- Loss: {rec['loss']}, lr {rec['lr']}, max length {rec['max_length']}, dtype {rec['dtype']}",
        f"- Data: {', '.join(Path(p).name for p in rec['data'])}",
        f"- Train: {training['train_prompts']} prompts, {training['train_pairs']} pairs; "
        f"dev: {training['dev_prompts']} prompts "
        f"(hash split, fraction {training['dev_fraction']}, seed {training['seed']})",
        f"- Steps: {training['steps']}, time {training['seconds']} s, {training['tokens_per_s']} tokens/s",
        f"- Trainable parameters: {training['trainable_parameters']:,}",
        "",
        "## Dev accuracy",
        "",
        "| subset | pairs | accuracy |",
        "| --- | --- | --- |",
    ]
    for name, m in (dev.get("subsets") or {}).items():
        lines.append(f"| {name} | {m['pairs']} | {m['accuracy']:.4f} |")
    if dev.get("accuracy") is not None:
        lines.append(f"| **all** | {dev['pairs']} | **{dev['accuracy']:.4f}** |")
    if dev.get("accuracy_when_better_is_shorter") is not None:
        lines += [
            "",
            f"Accuracy on the {dev['pairs_better_is_shorter']} dev pairs whose better answer is the "
            f"shorter one: {dev['accuracy_when_better_is_shorter']:.4f}.",
        ]
    if curves:
        lines += ["", "![training curves](training_curves.png)"]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    train(cfg)
    print(cfg.out)
    return 0
