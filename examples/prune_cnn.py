"""Prune a CIFAR-10 ResNet with MOONSHOT (sample-level Fisher, alpha chosen on held-out data).

    python examples/prune_cnn.py --depth 20 --sparsity 0.7
    python examples/prune_cnn.py --calib 128 --test 500       # seconds
"""
import argparse

import moonshot_fx
from moonshot_fx import data


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--depth", type=int, default=20, choices=[20, 56])
    p.add_argument("--sparsity", default="0.7")
    p.add_argument("--calib", type=int, default=1000)
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--alpha", default="auto", help="MOONSHOT alpha in [0, 1] or 'auto'")
    a = p.parse_args(argv)
    model = data.load_cifar_resnet(a.depth)
    cx, _ = data.load_cifar("calib", n=a.calib)
    tx, ty = data.load_cifar("test", n=a.test)
    dense = data.top1(model, tx, ty)
    moonshot_fx.sparsify(model, calibration=cx.split(64), sparsity=a.sparsity, method="moonshot",
                         alpha=a.alpha if a.alpha == "auto" else float(a.alpha), exclude=("conv1.weight",))
    r = model.moonshot_report
    print(r)
    print(f"dense top-1 {dense:.2f} -> MOONSHOT {a.sparsity} (alpha={r.alpha}) {data.top1(model, tx, ty):.2f}")
    return model


if __name__ == "__main__":
    main()
