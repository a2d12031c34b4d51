"""Prune at compile time: torch.compile with the moonshot-fx backend.

    python examples/compile_time_pruning.py
"""
import argparse

import torch

import moonshot_fx
from moonshot_fx import data


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--inner", default="inductor", help="inner torch.compile backend (inductor, eager)")
    a = p.parse_args(argv)
    model = data.load_cifar_resnet(20)
    cx, _ = data.load_cifar("calib", n=a.calib)
    tx, ty = data.load_cifar("test", n=a.test)
    dense = data.top1(model, tx, ty)
    be = moonshot_fx.backend(sparsity=0.5, method="sparsegpt", calibration=list(cx.split(64)),
                             inner=a.inner, exclude=("conv1.weight",))
    compiled = torch.compile(model, backend=be, dynamic=True)
    pruned = data.top1(compiled, tx, ty)  # first call compiles and prunes
    print(f"dense top-1 {dense:.2f} -> compiled + pruned at 50% {pruned:.2f}")
    return compiled


if __name__ == "__main__":
    main()
