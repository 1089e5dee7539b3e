"""The trainer's knobs: `TrainConfig` (recorded in the model card) and the `rmserve train` arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from models.data import FORMATS


@dataclass
class TrainConfig:
    """Every training knob, with its reason; recorded in the model card."""

    backbone: str = ""  # HF folder or .gguf file of the SFT model
    data: list[str] = field(default_factory=list)  # comparison files
    out: str = ""  # model directory to write
    format: str | None = None  # data format; None = detect per file
    init_model: str | None = None  # start from this reward model directory instead of a fresh head
    model_format: str = "auto"  # checkpoint format of --init-model (auto: detected from its files)
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
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices (not biases or norm weights)
    head_dropout: float = 0.0  # dropout on the pooled last-token state before the head, while training
    label_smoothing: float = 0.0  # pairwise: target P(better wins) = 1 - eps instead of 1
    early_stopping_patience: int = 0  # stop after N dev evaluations without a better accuracy; keep the best
    balance_subsets: bool = False  # repeat the prompts of smaller subsets so each subset weighs the same
    warmup: float = 0.05  # fraction of steps with linear warmup, then cosine decay to 10%
    batch_tokens: int = 4096  # padded tokens (longest x count) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    dev_fraction: float = 0.05  # share of prompts held out for dev (deterministic hash split)
    dev_max: int = 0  # evaluate only N dev examples, taken in turn from each subset (0 = all)
    time_limit: float = 0.0  # end the training loop after this many seconds (0 = none), then evaluate and save
    train_max: int = 0  # keep a seeded sample of this many training prompts (0 = all), for CPU budgets
    eval_every: int = 0  # dev evaluation every N steps (0 = only at the end)
    save_every: int = 50  # checkpoint every N steps (for --resume)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    dtype: str = "auto"  # autocast dtype for forward/backward: bfloat16 | float32 | auto (bf16 where fast)
    resume: bool = False  # continue from out/.checkpoint after a kill
    skip_bad: bool = False  # skip malformed lines (counted) instead of stopping
    norm_samples: int = 512  # training responses scored for the normalization mean/std
    cache_frozen: str = "auto"  # top-n: compute the frozen bottom layers once per sequence (auto | on | off)
    cache_dir: str = ""  # where frozen-layer states persist between runs ("" = RMSERVE_HOME/frozen-cache; none)
    cache_dtype: str = "auto"  # frozen-layer states' storage: float32 | bfloat16 | auto (the training dtype)
    prefix_sharing: str = "off"  # run each prompt once for all its responses, gradients through it (on | off)
    sharding: str = "ddp"  # under torchrun: ddp (full copy per rank) | fsdp (FSDP2: params, grads, Adam sharded)
    gradient_checkpointing: bool = False  # recompute decoder layers' activations in backward (long sequences)
    halt_after: int = 0  # testing aid: stop abruptly after N steps, like a kill (no final model)
    trained_dtype: str = "bfloat16"  # lora / top-n: dtype of OUT/trained/, the tensors training changed


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--backbone", required=False, default=None, help="SFT model: HF folder or .gguf file")
    p.add_argument("--init-model", default=None, help="start from this reward model directory (any format)")
    p.add_argument(
        "--model-format",
        default=d.model_format,
        choices=["auto", "rmserve", "hf", "openrlhf"],
        help="checkpoint format of --init-model (auto: detected from its files)",
    )
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
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (not biases, norms)")
    p.add_argument("--head-dropout", type=float, default=d.head_dropout, help="dropout before the head")
    p.add_argument(
        "--label-smoothing", type=float, default=d.label_smoothing, help="pairwise: target P(better) = 1 - eps"
    )
    p.add_argument(
        "--early-stopping-patience",
        type=int,
        default=d.early_stopping_patience,
        help="stop after N dev evaluations (--eval-every) without improvement; ship the best weights",
    )
    p.add_argument(
        "--balance-subsets", action="store_true", help="repeat smaller subsets' prompts so each subset weighs the same"
    )
    p.add_argument("--warmup", type=float, default=d.warmup, help="warmup fraction of steps")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="padded tokens per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--dev-fraction", type=float, default=d.dev_fraction)
    p.add_argument(
        "--dev-max",
        type=int,
        default=d.dev_max,
        help="evaluate only N dev examples, taken in turn from each subset (0 = all)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=d.time_limit,
        help="seconds: end the training loop after this long (the schedule still runs to --epochs/--max-steps), "
        "then evaluate and save as at the end; for equal-time recipe comparisons (0 = none)",
    )
    p.add_argument(
        "--train-max",
        type=int,
        default=d.train_max,
        help="a seeded sample of N training prompts, each with all its answers (0 = all)",
    )
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default=d.dtype,
        help="auto: bf16 on GPUs, fp32 on CPUs (ask for bfloat16 where the CPU has AMX/AVX512-BF16)",
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
        "--cache-dir",
        default=d.cache_dir,
        help="frozen-layer states kept here for later runs (default RMSERVE_HOME/frozen-cache; 'none': memory only)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=["auto", "float32", "bfloat16"],
        default=d.cache_dtype,
        help="storage of the frozen-layer states (auto: the training --dtype)",
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
    p.add_argument(
        "--sharding",
        choices=["ddp", "fsdp"],
        default=d.sharding,
        help="under torchrun: ddp keeps a full copy per rank; fsdp (PyTorch FSDP2) shards parameters, gradients "
        "and optimizer state over the ranks (each decoder layer and the root), for models that do not fit one device",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute decoder layers' activations in the backward pass: less memory, about 30%% more compute",
    )
    p.add_argument("--halt-after", type=int, default=0, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if not args.backbone and not args.init_model:
        raise ValueError("give --backbone (an SFT model) or --init-model (a reward model directory)")
    kw["backbone"] = args.backbone or ""
    cfg = TrainConfig(**kw)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Refuse knob values and combinations that cannot work, naming the flag and what is allowed."""
    for name in ("head_dropout", "label_smoothing"):
        v = getattr(cfg, name)
        if not 0 <= v < (1 if name == "head_dropout" else 0.5):
            allowed = "[0, 1)" if name == "head_dropout" else "[0, 0.5)"
            raise ValueError(f"--{name.replace('_', '-')} is {v}; it must lie in {allowed}")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay is {cfg.weight_decay}; it must be >= 0")
    if cfg.label_smoothing and cfg.loss != "pairwise":
        raise ValueError(f"--label-smoothing applies to --loss pairwise; --loss is {cfg.loss}")
    if cfg.early_stopping_patience < 0:
        raise ValueError(f"--early-stopping-patience is {cfg.early_stopping_patience}; it must be >= 0")
    if cfg.grad_accum < 1:
        raise ValueError(f"--grad-accum is {cfg.grad_accum}; it must be >= 1")
    if cfg.gradient_checkpointing and cfg.prefix_sharing == "on":
        raise ValueError(
            "--gradient-checkpointing and --prefix-sharing on do not combine: the shared-prefix pass keeps a KV "
            "cache, which transformers turns off under gradient checkpointing; drop one of them"
        )
    if cfg.time_limit < 0:
        raise ValueError(f"--time-limit is {cfg.time_limit}; it must be >= 0 (seconds; 0 = none)")
    if cfg.early_stopping_patience and not cfg.eval_every:
        raise ValueError("--early-stopping-patience needs dev evaluations during training: give --eval-every N")
