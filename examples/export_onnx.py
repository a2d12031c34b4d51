"""Prune ResNet-20 at 2:4 and export it to ONNX, verified against ONNX Runtime.

    python examples/export_onnx.py --out resnet20-2of4.onnx
"""
import argparse

import moonshot_fx
from moonshot_fx import data


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="resnet20-2of4.onnx")
    p.add_argument("--calib", type=int, default=256)
    a = p.parse_args(argv)
    model = data.load_cifar_resnet(20)
    cx, _ = data.load_cifar("calib", n=a.calib)
    moonshot_fx.sparsify(model, calibration=cx.split(64), sparsity="2:4", method="sparsegpt",
                         exclude=("conv1.weight",), progress=False)
    report = moonshot_fx.export_onnx(model, cx[:2], a.out, patterns="2:4")
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
