"""Networks a bundle can name in its `architecture` field.

Every network maps a float batch `[B, *input_shape]` to logits `[B, num_classes]`.
Names: `digits_cnn` (small CNN for 8×8 digits and their 8×4 DRS halves), `linear` (one
affine layer: the exact-answer model of docs/algorithms.md §8), `cifar_resnet20`,
`cifar_resnet110` (any `cifar_resnet<6k+2>`), and `torchvision:<name>` for torchvision's
ImageNet models, built without pretrained weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class Normalize(nn.Module):
    """(x − mean)/std per channel; placed inside the classifier, after the noise."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("normalize needs one mean and one positive std per channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DigitsCNN(nn.Module):
    """Three 3×3 convolutions and two linear layers; works on 8×8 images and 8×4 halves."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((2, 2)),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * width, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MnistCNN(nn.Module):
    """Three strided 3×3 convolutions and two linear layers for 28×28 images: about 0.4 million
    multiply-adds an image, so that 100,000 noisy samples take seconds on a CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((4, 4)),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * width, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Linear(nn.Module):
    """logits = W·flatten(x) + b."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6k+2 (20, 32, 44, 56, 110) as used by Cohen et al."""

    def __init__(self, depth: int, in_channels: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6k+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def build_architecture(
    name: str, input_shape: Sequence[int], num_classes: int, **kwargs
) -> nn.Module:
    """A freshly initialised network called `name` for inputs of `input_shape` (C, H, W)."""
    channels = int(input_shape[0])
    if name == "digits_cnn":
        return DigitsCNN(channels, num_classes, **kwargs)
    if name == "mnist_cnn":
        return MnistCNN(channels, num_classes, **kwargs)
    if name == "linear":
        return Linear(math.prod(int(s) for s in input_shape), num_classes)
    if name.startswith("cifar_resnet") and name[len("cifar_resnet"):].isdigit():
        return CifarResNet(int(name[len("cifar_resnet"):]), channels, num_classes)
    if name.startswith("torchvision:"):
        import torchvision  # imported here: only ImageNet-size bundles pay for it

        net = torchvision.models.get_model(
            name.split(":", 1)[1], weights=None, num_classes=num_classes, **kwargs
        )
        if channels != 3:
            raise ValueError(f"torchvision models take 3-channel images, not {channels}")
        return net
    raise ValueError(
        f"unknown architecture {name!r}: use digits_cnn, mnist_cnn, linear, cifar_resnet20, "
        "cifar_resnet110 (any cifar_resnet<6k+2>) or torchvision:<model name>"
    )


def list_architectures() -> list[str]:
    """The names `build_architecture` accepts (torchvision's as `torchvision:<name>`)."""
    import torchvision

    own = ["digits_cnn", "mnist_cnn", "linear", "cifar_resnet20", "cifar_resnet110"]
    return own + [f"torchvision:{m}" for m in torchvision.models.list_models()]
