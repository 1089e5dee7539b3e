"""Runtime parity on real HH-RLHF pairs: each runtime/dtype against torch fp32, by max score
difference and by agreement on which answer of a pair scores higher. JSON on the last line.

    python bench/parity.py --model DIR [--pairs 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hh_examples, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=50)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)

    from models.export import ONNX_FP32, ONNX_INT8, export_onnx
    from models.reward_model import RewardModel
    from service.runtimes.onnx_runtime import OnnxRuntime
    from service.runtimes.torch_runtime import TorchRuntime

    exs = hh_examples(args.pairs, seed=7)
    ref_model, tok = RewardModel.load(model_dir, dtype="float32")
    fmt = ref_model.formatter(tok)
    pairs = [[fmt.encode(ex.prompt, r).ids for r in ex.responses] for ex in exs]

    def scores(rt: Any) -> list[list[float]]:
        return [rt.score(p) for p in pairs]

    ref = scores(TorchRuntime(ref_model, tok.pad_token_id, prefix_sharing=False))
    del ref_model
    out: dict[str, Any] = {"model": str(model_dir), "pairs": len(pairs)}
    for spec in ("torch:bfloat16", "torch:float32+sharing", "onnx:float32", "onnx:int8"):
        if spec.startswith("torch"):
            dtype = spec.split(":")[1].split("+")[0]
            m, _ = RewardModel.load(model_dir, dtype=dtype)
            rt: Any = TorchRuntime(m, tok.pad_token_id, prefix_sharing=spec.endswith("+sharing"))
        else:
            int8 = spec.endswith("int8")
            if not (model_dir / (ONNX_INT8 if int8 else ONNX_FP32)).is_file():
                export_onnx(model_dir, int8=int8)
            rt, _ = OnnxRuntime.load(model_dir, threads=2, int8=int8)
        got = scores(rt)
        diff = max(abs(a - b) for p, q in zip(ref, got, strict=True) for a, b in zip(p, q, strict=True))
        agree = sum((p[0] > p[1]) == (q[0] > q[1]) for p, q in zip(ref, got, strict=True)) / len(pairs)
        out[spec] = {"max_abs_diff": diff, "pair_order_agreement": agree}
        print(f"{spec:24s} max |diff| {diff:.6f}   pair order agreement {agree:.3f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
