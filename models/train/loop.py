"""The training loop: optimizer steps over the micro-batches in seeded epoch order, with dev evaluation
and checkpoints along the way, resumable from the last checkpoint."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.evaluate import EncodedExample
from models.reward_model import RewardModel
from models.train.batches import build_batch, lr_lambda, micro_batch_stream
from models.train.checkpoint import (
    CHECKPOINT_DIR,
    check_resume,
    load_checkpoint,
    load_checkpoint_extra,
    load_sharded_checkpoint,
    load_trainable_state,
    read_checkpoint_state,
    save_checkpoint,
    save_sharded_checkpoint,
    trainable_state,
)
from models.train.config import TrainConfig
from models.train.distributed import Distributed, memory_per_rank
from models.train.methods import build_optimizer
from models.train.scorer import Scorer, batch_terms, evaluate_dev

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps: int
    history: list[dict[str, Any]]  # one record per step: loss, accuracy, lr (+ dev metrics when evaluated)
    tokens_per_s: float  # real (unpadded) training tokens per second of the loop
    halted: bool  # stopped by --halt-after, like a kill: no final model
    early_stopping: dict[str, Any] | None = None  # best step and accuracy, where training stopped


class EarlyStopping:
    """Keeps the trainable weights of the best dev accuracy so far and says when `patience`
    evaluations in a row brought no better one."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: float | None = None
        self.best_step = 0
        self.since_best = 0
        self.weights: dict[str, torch.Tensor] = {}

    def update(self, model: torch.nn.Module, accuracy: float, step: int) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.best is None or accuracy > self.best:
            self.best, self.best_step, self.since_best = accuracy, step, 0
            self.weights = trainable_state(model)
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        if self.weights:
            load_trainable_state(model, self.weights, "early stopping's best weights")

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}, self.weights

    def load(self, state: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]
        self.weights = weights


class Loop:
    """Optimizer, schedule and steps of one run over `batches` (lists of indices into `train`).

    The same model at any world size: one optimizer step takes `world x grad_accum` consecutive
    micro-batches of ONE seeded sequence (`micro_batch_stream`, which depends on the seed and the
    data, never on the number of ranks); rank r runs the r-th run of `grad_accum` of them. The last
    step of the run may find fewer: a rank left without one runs a repeat of the step's first
    micro-batch with weight 0, so every rank does the same passes (the collectives line up) and the
    step's gradient is that of the micro-batches that exist, at every world size. The loss is a sum
    over the step's prompts divided by their count across all ranks (and the centering term's
    responses likewise), so the averaged gradient equals one process's with `--grad-accum
    world x grad_accum`; the logged loss and accuracy are the global means.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: RewardModel,
        scorer: Scorer,
        data: tuple[Sequence[EncodedExample], Sequence[EncodedExample]],
        batches: list[list[int]],
        dist: Distributed | None = None,
    ) -> None:
        self.dist = dist or Distributed(0, 1, 0, torch.device("cpu"))
        self.cfg, self.model, self.scorer, self.batches = cfg, model, scorer, batches
        self.is_main = self.dist.is_main
        self.train, self.dev = data
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(model, cfg)
        self.per_step = self.dist.world * cfg.grad_accum  # micro-batches per optimizer step, all ranks
        n_micro = math.ceil(len(batches) * cfg.epochs)
        self.total_steps = cfg.max_steps or max(1, math.ceil(n_micro / self.per_step))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(self.total_steps, cfg.warmup))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.tokens_seen = 0
        self.memory: dict[str, int] | None = None  # bytes per rank, measured after the first step
        self.early = EarlyStopping(cfg.early_stopping_patience) if cfg.early_stopping_patience else None
        self.stop = False  # set by early stopping
        self.time_limited = False  # set when --time-limit ended the loop
        # dev evaluation: rank 0 alone, except under FSDP where every rank holds a shard of the model
        self.evaluates = self.is_main or self.dist.fsdp

    def resume(self, out: Path) -> None:
        """Continue from OUT/.checkpoint; ValueError (before anything is loaded) when this run's step
        sequence differs from the checkpoint's (`check_resume`)."""
        check_resume(read_checkpoint_state(out), self.cfg, self.dist.world, out / CHECKPOINT_DIR)
        if self.dist.fsdp:
            self.step, self.history = load_sharded_checkpoint(out, self.model, self.opt, self.sched)
        else:
            self.step, self.history = load_checkpoint(out, self.model, self.opt, self.sched)
            extra = load_checkpoint_extra(out)
            if self.early is not None and extra is not None:
                self.early.load(*extra)
        log.info("resumed at step %d", self.step)

    def run(self, out: Path) -> LoopResult:
        cfg = self.cfg
        stream = micro_batch_stream(len(self.batches), cfg.epochs if not cfg.max_steps else 1e9, cfg.seed)
        for _ in range(self.step * self.per_step):
            next(stream)
        from tqdm import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.is_main,
            desc="train",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        t_loop = time.time()
        halted = False
        while self.step < self.total_steps:
            rec = self._optimizer_step(stream)
            if rec is None:
                break
            tps = self.tokens_seen / max(1e-9, time.time() - t_loop)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['accuracy']:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            self._after_step(rec, out)
            if self.stop:
                break
            # every rank reads its own clock; they stop together if any is past the limit (one rank
            # leaving the loop alone would meet the others' next step with a different collective)
            over = bool(cfg.time_limit) and time.time() - t_loop >= cfg.time_limit
            if cfg.time_limit and self.step < self.total_steps and self.dist.any_rank(over):
                log.info(
                    "time limit: %.0f s of training reached at step %d of %d",
                    cfg.time_limit,
                    self.step,
                    self.total_steps,
                )
                self.time_limited = True
                if self.early is not None and self.evaluates and self.dev and "dev" not in rec:
                    rec["dev"] = evaluate_dev(self.model, self.dev, self.scorer, cfg.batch_tokens)
                    self.early.update(self.model, rec["dev"]["accuracy"] or 0.0, self.step)
                break
            if cfg.halt_after and self.step >= cfg.halt_after:
                log.warning("halting after step %d as asked (--halt-after)", self.step)
                halted = True
                break
        bar.close()
        tokens_per_s = self.tokens_seen / max(1e-9, time.time() - t_loop)
        return LoopResult(self.step, self.history, tokens_per_s, halted, None if halted else self._keep_best())

    def memory_all_ranks(self) -> list[dict[str, int]]:
        """`memory` (bytes of parameters, gradients, optimizer state after the first step) of every
        rank, in rank order; a collective under torchrun."""
        mine = self.memory or {"parameters": 0, "gradients": 0, "optimizer_state": 0}
        keys = list(mine)
        flat = [0.0] * (len(keys) * self.dist.world)
        for k, key in enumerate(keys):
            flat[self.dist.rank * len(keys) + k] = float(mine[key])
        flat = self.dist.all_sum(flat)
        return [{key: int(flat[r * len(keys) + k]) for k, key in enumerate(keys)} for r in range(self.dist.world)]

    def _keep_best(self) -> dict[str, Any] | None:
        """With early stopping: put the best evaluation's weights back; what happened, for the card."""
        if self.early is None or self.early.best is None:
            return None
        self.early.restore(self.model)
        log.info(
            "early stopping: %s at step %d; keeping step %d (dev accuracy %.4f)",
            "stopped" if self.stop else "ran to the end",
            self.step,
            self.early.best_step,
            self.early.best,
        )
        return {
            "best_step": self.early.best_step,
            "best_accuracy": self.early.best,
            "stopped": self.stop,
            "time_limited": self.time_limited,
        }

    def _optimizer_step(self, stream: Iterator[tuple[int, int]]) -> dict[str, Any] | None:
        """Forward and backward over this rank's share of the step's micro-batches, then one
        optimizer step; None when the stream has ended (on every rank alike)."""
        cfg, dist = self.cfg, self.dist
        step_batches = [b for _epoch, b in itertools.islice(stream, self.per_step)]  # the same on every rank
        if not step_batches:
            return None
        mine = step_batches[dist.rank * cfg.grad_accum : (dist.rank + 1) * cfg.grad_accum]
        weights = [1.0] * len(mine)
        if dist.collective:  # every rank runs grad_accum passes; the missing ones count for nothing
            weights += [0.0] * (cfg.grad_accum - len(mine))
            mine += [step_batches[0]] * (cfg.grad_accum - len(mine))
        built = [build_batch(self.train, self.batches[b]) for b in mine]
        # Denominators of the whole step: prompts, responses and pairs over every rank's real micro-batches.
        totals = dist.all_sum(
            [
                sum(w * (max(b.resp_group) + 1) for w, b in zip(weights, built, strict=True)),
                sum(w * len(b.seqs) for w, b in zip(weights, built, strict=True)),
                sum(w * len(b.better) for w, b in zip(weights, built, strict=True)),
            ]
        )
        prompts, responses, pairs = totals
        # DDP and FSDP average the gradients over ranks; the loss is a global mean, so undo that.
        scale = float(dist.world) if dist.collective else 1.0
        self.opt.zero_grad(set_to_none=True)
        loss_sum = correct = 0.0
        for w, batch in zip(weights, built, strict=True):
            t = batch_terms(self.scorer.rewards(self.train, batch), batch, cfg)
            loss = t.main / prompts
            if t.center is not None:
                loss = loss + t.center / responses
            (loss * (w * scale)).backward()
            loss_sum += w * loss.item()
            correct += w * t.correct
            self.tokens_seen += int(w) * batch.real_tokens
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.memory is None:
            self.memory = memory_per_rank(self.model, self.opt)
            log.info(
                "rank %d holds %s bytes of parameters, %s of gradients, %s of optimizer state",
                dist.rank,
                f"{self.memory['parameters']:,}",
                f"{self.memory['gradients']:,}",
                f"{self.memory['optimizer_state']:,}",
            )
        loss_all, correct_all = dist.all_sum([loss_sum, correct])
        return {
            "step": self.step,
            "loss": loss_all,
            "accuracy": correct_all / max(1.0, pairs),
            "lr": self.sched.get_last_lr()[-1],
        }

    def _after_step(self, rec: dict[str, Any], out: Path) -> None:
        """Dev evaluation and checkpoint when due (not at the last step, where the run's end does both,
        except that early stopping evaluates there too: the last weights compete with the best)."""
        cfg, step = self.cfg, self.step
        last = step >= self.total_steps
        on_interval = bool(cfg.eval_every) and step % cfg.eval_every == 0 and not last
        if self.evaluates and self.dev and (on_interval or (last and self.early is not None)):
            rec["dev"] = evaluate_dev(self.model, self.dev, self.scorer, cfg.batch_tokens)
            log.info("step %d: dev accuracy %.4f", step, rec["dev"]["accuracy"] or 0.0)
            if self.early is not None:
                self.stop = self.early.update(self.model, rec["dev"]["accuracy"] or 0.0, step)
        self.history.append(rec)
        if not (cfg.save_every and step % cfg.save_every == 0 and not last and not self.stop):
            return
        if self.dist.fsdp:  # every rank writes its shards
            save_sharded_checkpoint(out, self.model, self.opt, self.sched, step, self.history, cfg, self.dist)
        elif self.is_main:
            extra = self.early.state() if self.early is not None else None
            save_checkpoint(out, self.model, self.opt, self.sched, step, self.history, cfg, extra, self.dist.world)
