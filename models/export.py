"""Export a reward model directory to ONNX (`rmserve export`): pooling inside the graph, dynamic
batch and length axes.

int8 is refused (`Int8Refused`), measured on the default model (SmolLM2-135M, 40 HH dev pairs, against
torch fp32): onnxruntime's dynamic int8 reordered 30% of the pairs (max |diff| 1.82; u8/u8 1.17 and 30%,
per-channel weights 1.31 and 25%, per-channel with the down_proj MatMuls kept in fp32 0.74 and 17.5%):
the activations of a Llama body have outlier channels that one scale per tensor cannot hold, and that
scale is computed over the whole batch, so a row's reward depends on its batch-mates by construction.
Weight-only int8 (MatMulNBits, 8 bits, blocks of 128, fp32 compute) is batch-invariant but still moved
scores by 0.073 (2.5% of pairs reordered) and ran slower than torch fp32; with int8 compute
(accuracy_level 4) 0.28 and batch-dependent (0.25).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

import torch

from models.reward_model import RewardModel, collate

log = logging.getLogger(__name__)

ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
INT8_REFUSED = (
    "int8 is not offered: onnxruntime's dynamic int8 scales each MatMul's activations by one factor for "
    "the whole batch, so a reward would depend on its batch-mates, and on the default model it reordered "
    "30% of HH pairs against fp32 (weight-only int8 still 2.5%, and slower than fp32); use float32 "
    "(torch, or ONNX Runtime with `rmserve export`)"
)


class Int8Refused(ValueError):
    """int8 was asked for; the message says why it is not offered (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(INT8_REFUSED)


def export_hf(model_dir: str | Path, out: str | Path, *, model_format: str | None = None) -> Path:
    """Write `model_dir` (any format rmserve reads) as an rmserve directory in the transformers form at
    `out` (models/checkpoints/rmserve.py `save`): `AutoModelForSequenceClassification.from_pretrained(out)`
    then gives what rmserve serves from `out`. A head with a bias (models trained before issue 22) loses
    it: raw rewards become `old - bias`, and the normalization mean moves with them, so normalized rewards
    and rankings are unchanged."""
    if out is None:
        raise ValueError("--format hf needs --out DIR (a new model directory)")
    if Path(out).resolve() == Path(model_dir).resolve():
        raise ValueError("--out must be a new directory, not the model directory itself")
    model, tok = RewardModel.load(model_dir, dtype="float32", format=model_format)
    return model.save(out, tok)


def export_onnx(
    model_dir: str | Path, out: str | Path | None = None, *, int8: bool = False, model_format: str | None = None
) -> Path:
    """Write the fp32 ONNX graph (MODEL/model.onnx unless `out`) of a model in any format rmserve reads;
    `int8` raises Int8Refused."""
    if int8:
        raise Int8Refused()
    d = Path(model_dir)
    model, tok = RewardModel.load(d, dtype="float32", format=model_format)
    # Eager attention exports to plain MatMul/Softmax that every ONNX Runtime build runs.
    model.body.config._attn_implementation = "eager"
    model.eval()
    fp32_path = d / ONNX_FP32 if out is None else Path(out)
    ids, mask = collate([[tok.pad_token_id] * 7, [tok.pad_token_id] * 3], tok.pad_token_id, "right")
    tmp = fp32_path.with_name(fp32_path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            str(tmp),
            input_names=["input_ids", "attention_mask"],
            output_names=["rewards"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "rewards": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, fp32_path)
    log.info("wrote %s", fp32_path)
    return fp32_path


def main(args: argparse.Namespace) -> int:
    model_format = getattr(args, "model_format", None)
    if getattr(args, "format", "onnx") == "hf":
        if args.int8:
            raise Int8Refused()
        print(export_hf(args.model, args.out, model_format=model_format))
    else:
        print(export_onnx(args.model, args.out, int8=args.int8, model_format=model_format))
    return 0
