"""Export a reward model directory to ONNX (`rmserve export`): pooling inside the graph, dynamic
batch and length axes; `--int8` adds onnxruntime's dynamic int8 quantization."""

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


def export_onnx(model_dir: str | Path, out: str | Path | None = None, *, int8: bool = False) -> Path:
    d = Path(model_dir)
    model, tok = RewardModel.load(d, dtype="float32")
    # Eager attention exports to plain MatMul/Softmax that every ONNX Runtime build runs.
    model.body.config._attn_implementation = "eager"
    model.eval()
    fp32_path = d / ONNX_FP32 if out is None or int8 else Path(out)
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
    if not int8:
        log.info("wrote %s", fp32_path)
        return fp32_path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = Path(out) if out else d / ONNX_INT8
    tmp = int8_path.with_name(int8_path.name + ".tmp")
    quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, int8_path)
    log.info("wrote %s", int8_path)
    return int8_path


def main(args: argparse.Namespace) -> int:
    print(export_onnx(args.model, args.out, int8=args.int8))
    return 0
