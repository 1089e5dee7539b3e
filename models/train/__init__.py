"""The offline trainer (`rmserve train`): ranked human comparisons in, a reward model directory out.

One module per concern, in the order a run uses them:

- `config`: `TrainConfig` (every knob, recorded in the model card) and the CLI arguments
- `methods`: what trains (full, top-N layers, LoRA) and the optimizer over it
- `batches`: prompts packed into micro-batches, the epoch order, the learning-rate schedule
- `scorer`: batch -> rewards (plain, frozen-layer cache, shared prefixes), the loss, dev evaluation
- `distributed`: one process or several under torchrun (DDP or FSDP2), global sums, memory per rank
- `checkpoint`: OUT/.checkpoint for `--resume`
- `loop`: optimizer steps with evaluation and checkpoints along the way
- `card`: normalization statistics and the model card
- `run`: `train()`, the recipe that calls the others, and the CLI entry point
"""

from models.evaluate import EncodedExample
from models.train.batches import Batch, build_batch, lr_lambda, make_batches, micro_batch_stream
from models.train.card import normalization, write_card
from models.train.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from models.train.config import TrainConfig, add_train_args, config_from_args
from models.train.distributed import Distributed, dist_info, memory_per_rank, resolve_device
from models.train.loop import EarlyStopping, Loop, LoopResult
from models.train.methods import (
    add_head_dropout,
    apply_method,
    build_optimizer,
    final_norm,
    merge_method,
    transformer_layers,
    use_frozen_cache,
)
from models.train.run import TRAINED_DIR, TrainData, balanced_order, build_batches, load_data, load_model, main, train
from models.train.scorer import LossTerms, Scorer, batch_loss, batch_terms, evaluate_dev

__all__ = [
    "CHECKPOINT_DIR",
    "TRAINED_DIR",
    "Batch",
    "Distributed",
    "EarlyStopping",
    "EncodedExample",
    "Loop",
    "LoopResult",
    "LossTerms",
    "Scorer",
    "TrainConfig",
    "TrainData",
    "add_head_dropout",
    "add_train_args",
    "apply_method",
    "balanced_order",
    "batch_loss",
    "batch_terms",
    "build_batch",
    "build_batches",
    "build_optimizer",
    "config_from_args",
    "dist_info",
    "evaluate_dev",
    "final_norm",
    "load_checkpoint",
    "load_data",
    "load_model",
    "lr_lambda",
    "main",
    "make_batches",
    "memory_per_rank",
    "merge_method",
    "micro_batch_stream",
    "normalization",
    "resolve_device",
    "save_checkpoint",
    "train",
    "transformer_layers",
    "use_frozen_cache",
    "write_card",
]
