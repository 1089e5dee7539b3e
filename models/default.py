"""The default reward model: the fetched SmolLM2 backbone + the weights shipped in models/default/."""

from __future__ import annotations

from pathlib import Path

from models.backbone import BackboneError, default_home

SHIPPED = Path(__file__).resolve().parent / "default"


def default_model_dir() -> Path:
    """The assembled default model directory, building it on first use."""
    return build_default()


def build_default(out: str | Path | None = None, backbone: str | Path | None = None) -> Path:
    if not (SHIPPED / "rmserve.json").is_file():
        raise BackboneError(
            "the default reward model is not yet available in this version (models/default/ holds no "
            "trained weights); serve a model you trained with `rmserve serve --model DIR`"
        )
    raise BackboneError("build-default: not yet available")  # pragma: no cover


__all__ = ["build_default", "default_home", "default_model_dir"]
