"""The design most reward-model servers ship, for comparison: one request at a time, an fp32 model,
no cross-request batching (a request's own responses are padded into one batch).

    python bench/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from models.reward_model import RewardModel, collate


class Req(BaseModel):
    prompt: str | list[dict[str, str]]
    responses: list[str]


def main() -> None:
    model_dir, port = sys.argv[1], int(sys.argv[2])
    model, tok = RewardModel.load(model_dir, dtype="float32")
    model.eval()
    fmt = model.formatter(tok)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/score")
    def score(req: Req) -> dict[str, object]:
        with lock, torch.inference_mode():
            seqs = [fmt.encode(req.prompt, r).ids for r in req.responses]
            ids, mask = collate(seqs, tok.pad_token_id, "right")
            scores = model(ids, mask).tolist()
        return {"scores": scores, "usage": {"tokens": sum(len(s) for s in seqs)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
