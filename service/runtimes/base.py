from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Runtime(Protocol):
    """Scores token id lists; blocking, called from the batcher's worker thread."""

    name: str  # "torch" | "onnx"
    dtype: str  # "float32" | "bfloat16" | "int8"

    def score(self, seqs: Sequence[Sequence[int]]) -> list[float]: ...

    def warmup(self) -> None: ...
