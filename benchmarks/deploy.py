"""Deployment figures: prune at 2:4, export to ONNX, check against ONNX Runtime, report sizes.

    python benchmarks/deploy.py --models resnet20 smollm2

For each model: prune at 2:4 (ResNet-20: SparseGPT on 256 calibration images, first conv dense;
SmolLM2-135M: magnitude, no calibration, since parity does not depend on how the zeros were
chosen), ``moonshot_fx.export_onnx(..., dynamic=True, patterns="2:4")`` with the ORT-optimised
model saved too, then record ORT parity on fresh input shapes (max |ORT − eager|), the tolerance
it was held to, whether every pruned zero and the 2:4 pattern survived ORT's optimisation, and
the file sizes. Writes ``benchmarks/results/deploy.json`` (with a markdown table the README
shows); the ``.onnx`` files go to a temporary folder unless ``--keep DIR``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

import moonshot_fx  # noqa: E402
from moonshot_fx import data  # noqa: E402
from moonshot_fx.backends.onnx import InitializerCheck, OnnxReport  # noqa: E402


def _resnet20(folder: Path) -> tuple[Any, str]:
    model = data.load_cifar_resnet(20)
    imgs = data.load_cifar("calib")[0][:256]
    moonshot_fx.sparsify(model, imgs[:2], calibration=[imgs], sparsity="2:4", method="sparsegpt",
                         exclude=["conv1.weight"], progress=False)
    t = time.perf_counter()
    rep = moonshot_fx.export_onnx(model, imgs[:2], folder / "resnet20-2of4.onnx", patterns="2:4",
                                  optimized_path=folder / "resnet20-2of4.opt.onnx")
    return rep, f"{time.perf_counter() - t:.1f}"


def _smollm2(folder: Path) -> tuple[Any, str]:
    model, _ = data.load_smollm2(progress=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 32), generator=gen)
    moonshot_fx.sparsify(model, {"input_ids": ids}, sparsity="2:4", method="magnitude", progress=False)
    t = time.perf_counter()
    rep = moonshot_fx.export_onnx(model, {"input_ids": ids}, folder / "smollm2-2of4.onnx", patterns="2:4",
                                  optimized_path=folder / "smollm2-2of4.opt.onnx")
    return rep, f"{time.perf_counter() - t:.1f}"


MODELS = {"resnet20": ("ResNet-20 (CIFAR-10), SparseGPT 2:4", _resnet20),
          "smollm2": ("SmolLM2-135M, magnitude 2:4", _smollm2)}


def _report(d: dict[str, Any]) -> OnnxReport:
    """An :class:`OnnxReport` back from its ``to_dict`` form (for its derived properties)."""
    return OnnxReport(**{**d, "checks": [InitializerCheck(**c) for c in d["checks"]]})


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["**Deployment: ONNX export checked by ONNX Runtime** (`python benchmarks/deploy.py`; CPU "
             "execution provider, ORT-optimised at level `extended`)", "",
             "| model | fresh input shapes | max abs diff (ORT vs eager) | tolerance | pruned weights located / zeros kept / 2:4 valid | .onnx MB | ORT-optimised MB |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        rep = _report(r["report"])
        n = len(rep.pruned_params)
        found = n - len(rep.not_found.get("optimized", []))
        shapes = ", ".join(f"{k} {v}" for k, v in rep.verify_shapes.items())
        diff = max(d for d in (rep.max_abs_diff, rep.example_max_abs_diff, rep.optimized_max_abs_diff) if d is not None)
        lines.append(f"| {r['label']} | {shapes} | {diff:.2g} | {rep.tolerance:.2g} (max output {rep.output_scale:.3g}) | "
                     f"{found}/{n} / {'yes' if rep.zeros_ok else 'NO'} / {'yes' if rep.patterns_ok else 'NO'} | "
                     f"{rep.size_bytes / 1e6:.1f} | {(rep.optimized_size_bytes or 0) / 1e6:.1f} |")
    lines += ["", "ONNX stores the pruned weights densely (same file size as dense); the zeros pay off in a "
              "sparse runtime: `export_onnx(..., tensorrt_config_path=...)` writes TensorRT execution-provider "
              "options with `trt_sparsity_enable`, and `moonshot_fx.to_semi_structured` gives torch 2:4 "
              "tensors on CUDA sm80+."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--keep", type=Path, default=None, help="keep the .onnx files in this folder")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            label, fn = MODELS[name]
            rep, secs = fn(folder)
            print(rep.summary(), flush=True)
            rows.append({"model": name, "label": label, "export_seconds": float(secs), "report": rep.to_dict()})
    doc = {"machine": machine(), "command": "python benchmarks/deploy.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "markdown": markdown(rows)}
    write_json(RESULTS / "deploy.json", doc)
    print(doc["markdown"])


if __name__ == "__main__":
    main()
