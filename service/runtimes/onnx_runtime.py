from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class OnnxRuntime:
    """The exported reward model under ONNX Runtime, fp32 (int8 is refused: see models/export.py).

    Shared-prefix scoring is not available here: the exported graph takes whole sequences only.
    """

    name = "onnx"
    forward = "padded"  # whole right-padded sequences; bit-for-bit batch invariance is measured, not built in
    batch_invariant: bool | None = None  # as measured by `auto` (service.runtimes.mode_of), else unknown

    def __init__(self, session: Any, pad_id: int, dtype: str) -> None:
        self.session = session
        self.pad_id = pad_id
        self.dtype = dtype

    @classmethod
    def load(cls, model_dir: str | Path, *, threads: int = 1, int8: bool = False) -> tuple[OnnxRuntime, Any]:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from models.export import ONNX_FP32, Int8Refused
        from models.reward_model import ModelDirError

        if int8:
            raise Int8Refused()
        d = Path(model_dir)
        path = d / ONNX_FP32
        if not path.is_file():
            raise ModelDirError(f"{path} is missing: export the model first with `rmserve export --model {d}`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelDirError(f"{path} cannot be loaded by ONNX Runtime: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(str(d))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(session, tokenizer.pad_token_id, "float32"), tokenizer

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]:
        t = max(len(s) for s in seqs)
        ids = np.full((len(seqs), t), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), t), dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        (rewards,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        return [float(x) for x in rewards]

    def warmup(self) -> None:
        self.score([[self.pad_id] * 8, [self.pad_id] * 4])
