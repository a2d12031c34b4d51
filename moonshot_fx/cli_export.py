"""The ``moonshot-fx export`` subcommand: load a model (bundled, a user model, a checkpoint), export
it to ONNX and verify it (:func:`moonshot_fx.backends.onnx_export.export_onnx`)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from moonshot_fx.backends.onnx_export import export_onnx
from moonshot_fx.errors import BackendUnavailableError, MoonshotError
from moonshot_fx.user_models import model_arg_type

# ---------------------------------------------------------------------------------------------
# CLI helper


_MODELS = ("resnet20", "resnet56", "stories260k", "smollm2")


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand's arguments to ``parser``."""
    parser.add_argument("--model", required=True, type=model_arg_type(_MODELS),
                        help=f"a bundled model ({', '.join(_MODELS)}), a Hugging Face model directory, a .gguf "
                             "file, or timm:NAME / torchvision:NAME (then --checkpoint FILE)")
    parser.add_argument("--checkpoint", help="torch state_dict (e.g. a pruned model) loaded with weights_only=True")
    parser.add_argument("--num-classes", type=int, default=None, help="timm/torchvision: classifier size of --checkpoint")
    parser.add_argument("--out", required=True, help="destination .onnx file")
    parser.add_argument("--optimized-out", default=None, help="also save ORT's optimised model here")
    parser.add_argument("--pattern", default=None, help="check this pattern (e.g. 2:4) on pruned weights")
    parser.add_argument("--tensorrt-config", default=None, help="write TensorRT EP options (sparsity on) here")
    parser.add_argument("--no-verify", action="store_true", help="report but do not fail on verification")
    return parser


def _load_user_model(text: str, num_classes: int | None = None) -> tuple[nn.Module, Any]:
    """The user's model (an HF directory / .gguf file with its weights; timm / torchvision: the
    architecture, whose --checkpoint export_main loads) and a random example input."""
    from moonshot_fx.user_models import example_inputs, load_user_model, parse_model_arg

    user = load_user_model(parse_model_arg(text), need_tokenizer=False, require_checkpoint=False,
                           num_classes=num_classes)
    return user.model, example_inputs(user)


def _load_cli_model(name: str, pretrained: bool = True) -> tuple[nn.Module, Any]:
    """The model ``name`` (pretrained weights; for ResNets only the architecture when
    ``pretrained`` is False, as a checkpoint will overwrite it) and an example input."""
    try:
        from moonshot_fx import data
    except ImportError as e:  # pragma: no cover - data ships with the package
        raise BackendUnavailableError(f"moonshot_fx.data is unavailable: {e}") from e
    if name in ("resnet20", "resnet56"):
        depth = int(name[len("resnet"):])
        model = data.load_cifar_resnet(depth) if pretrained else data.resnet_cifar(depth)
        return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if name == "stories260k":
        model, _ = data.load_stories260k()
    else:
        model, _ = data.load_smollm2()
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}


def export_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of ``moonshot-fx export``: build the model, load ``--checkpoint``, export.

    ``args`` is an already parsed namespace (from a parser set up with
    :func:`add_export_arguments`) or a list of command-line strings. Returns the exit code.
    """
    if args is None or not isinstance(args, argparse.Namespace):
        parser = add_export_arguments(argparse.ArgumentParser(prog="moonshot-fx export"))
        args = parser.parse_args(None if args is None else list(args))
    checkpoint = getattr(args, "checkpoint", None)
    if args.model in _MODELS:
        model, example = _load_cli_model(args.model, pretrained=not checkpoint)
    else:
        model, example = _load_user_model(args.model, getattr(args, "num_classes", None))
    if checkpoint:
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
    model.eval()
    try:
        report = export_onnx(
            model, example, args.out, optimized_path=getattr(args, "optimized_out", None),
            patterns=getattr(args, "pattern", None), tensorrt_config_path=getattr(args, "tensorrt_config", None),
            verify=not getattr(args, "no_verify", False),
        )
    except MoonshotError as e:
        print(f"moonshot-fx export: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.ok else 1
