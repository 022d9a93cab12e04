"""ResNets of the paper's experiments (docs/method.md §6).

PreAct ResNet for CIFAR (16/32/64 channels, ``(depth − 2)/6`` blocks a stage, 1×1 conv shortcut
when the shape changes) and the ImageNet ResNet-18/50 (He et al. 2016, torchvision layout and
parameter counts). Initialisation is not torchvision's: convolutions keep PyTorch's default
(Kaiming-uniform with ``a = √5``; torchvision uses Kaiming-normal, fan-out), and the last
BatchNorm of every ResNet-18/50 block starts at zero (Goyal et al. 2017, and NVIDIA's ResNet-50
recipe, whose settings docs/method.md §6 lists; torchvision's ``zero_init_residual`` defaults
to off).
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"PreAct ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)  # (N, 16, 32, 32)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(PreActBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)  # (N, 64, 8, 8)
        self.bn = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        out = nn.functional.relu(self.bn(out)).mean((2, 3))  # (N, 64)
        return self.head(out)


@register_model("preact_resnet20", task="image", summary="PreAct ResNet-20 (CIFAR)")
def preact_resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return PreActResNet(20, num_classes, in_channels)


@register_model("preact_resnet56", task="image", summary="PreAct ResNet-56 (CIFAR, the paper's)")
def preact_resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return PreActResNet(56, num_classes, in_channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class ResNet(nn.Module):
    def __init__(
        self, block: type, counts: tuple[int, ...], num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False),  # (N, 64, 112, 112)
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),  # (N, 64, 56, 56)
        )
        stages, in_planes = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            for j in range(count):
                stages.append(block(in_planes, planes, 2 if (j == 0 and i > 0) else 1))
                in_planes = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (Bottleneck, BasicBlock)):  # zero-init the last BN of each block
                nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


@register_model("resnet18", task="image", summary="ResNet-18 (ImageNet)")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet50", task="image", summary="ResNet-50 (ImageNet, the paper's headline)")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)
