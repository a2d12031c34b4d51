"""CIFAR-10 ResNets ("option A" shortcuts, He et al. 2016) and the CIFAR-10 evaluation data.

The architecture matches akamaster/pytorch_resnet_cifar10 so its pretrained checkpoints load
directly, but is written to be ``torch.export`` / FX traceable: no lambdas, no data-dependent
Python control flow, and the shortcut is a small ``nn.Module``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .paths import data_file

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR_CHECKPOINTS",
    "PadShortcut",
    "BasicBlock",
    "CifarResNet",
    "resnet_cifar",
    "load_cifar_resnet",
    "load_cifar",
    "top1",
]

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)

#: Pretrained checkpoints available in the data root, by depth.
CIFAR_CHECKPOINTS: dict[int, str] = {
    20: "vision/cifar10/resnet20-12fca82f.th",
    56: "vision/cifar10/resnet56-4bfd9763.th",
}


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 spatially and zero-pad channels on both sides."""

    def __init__(self, pad_channels: int) -> None:
        super().__init__()
        self.pad_channels = int(pad_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad_channels
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or option-A) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: conv(16) + 3 stages of ``n`` BasicBlocks (16/32/64 channels)
    + global average pool + ``Linear(64, num_classes)``; depth = 6n + 2."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, n, stride in zip((16, 32, 64), num_blocks, (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def resnet_cifar(depth: int, num_classes: int = 10) -> nn.Module:
    """Randomly initialised CIFAR ResNet of the given depth (20, 32, 44, 56, 110, ...: 6n+2)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)


def load_cifar_resnet(depth: int) -> nn.Module:
    """Pretrained CIFAR-10 ResNet-``depth`` (20 or 56) in eval mode, on CPU.

    Raises:
        ValueError: if no checkpoint exists for ``depth``.
        FileNotFoundError: if the checkpoint file is missing from the data root.
    """
    if depth not in CIFAR_CHECKPOINTS:
        raise ValueError(f"no pretrained checkpoint for ResNet-{depth}; available: {sorted(CIFAR_CHECKPOINTS)}")
    ckpt = torch.load(data_file(CIFAR_CHECKPOINTS[depth]), map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    model = resnet_cifar(depth)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def load_cifar(
    split: Literal["test", "calib"] = "test", n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 images as normalized float32 ``(N, 3, 32, 32)`` and long labels ``(N,)``.

    Args:
        split: ``"test"`` (10,000 test images) or ``"calib"`` (1,000 training images, 100 per
            class, for calibration).
        n: keep ``n`` images: the first ``n`` of a fixed (seed 0) permutation, so every class is
            represented (the files are sorted by class; a plain prefix would be one class).

    Images are scaled to [0, 1] and normalized with mean (0.485, 0.456, 0.406) and std
    (0.229, 0.224, 0.225), as the pretrained checkpoints expect.
    """
    if split not in ("test", "calib"):
        raise ValueError(f"split must be 'test' or 'calib', got {split!r}")
    with np.load(data_file(f"vision/cifar10/{split}.npz")) as d:
        images = d["images"]
        labels = d["labels"]
    if n is not None and n < len(labels):
        order = np.random.default_rng(0).permutation(len(labels))[:n]
        images, labels = images[order], labels[order]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = ((x - mean) / std).contiguous()
    return x, torch.from_numpy(np.asarray(labels)).long()


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (called in eval mode) on ``images``/``labels``."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    correct = 0
    try:
        for s in range(0, images.shape[0], batch_size):
            out = model(images[s : s + batch_size].to(device))
            correct += (out.argmax(dim=-1).cpu() == labels[s : s + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return 100.0 * correct / max(images.shape[0], 1)
