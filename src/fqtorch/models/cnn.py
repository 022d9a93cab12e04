"""``digits_cnn``: a small CNN for the 8×8 digits images that ship with scikit-learn."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),  # (N, w, 8, 8)
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (N, 2w, 4, 4)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("digits_cnn", task="image", summary="small CNN for 8x8 digits (default)")
def digits_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return DigitsCNN(num_classes, in_channels)
