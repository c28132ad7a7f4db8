"""Models selectable from config/model/. Each takes the dataset's `in_shape` and `num_classes`."""
from typing import Literal, Sequence

import torch
import torch.nn as nn

from src.errors import UserError


class MLP(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200, 200)):
        super().__init__()
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {list(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(torch.tensor(in_shape).prod())
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _need_image(name: str, in_shape: Sequence[int]) -> None:
    if len(in_shape) != 3:
        raise UserError(f"model {name} needs image input (C, H, W) but the dataset gives shape "
                        f"{tuple(in_shape)}: use model=mlp for this dataset")


class LeNet(nn.Module):
    """FedSeq's LeNet-style CNN: two 5x5 convolutions of 64 channels, each followed by ReLU and
    2x2 max-pooling, then fully connected 384 -> 192 -> classes; sized to the input shape."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, channels: int = 64):
        super().__init__()
        _need_image("lenet", in_shape)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *in_shape)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout, groups)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout, groups))

    def forward(self, x):
        out = torch.relu(self.n1(self.conv1(x)))
        return torch.relu(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs (He et al. 2016, Sec. 4.2): 3 stages of 3 basic blocks with
    16/32/64 channels; GroupNorm (Hsieh et al. 2020, the usual FL choice) or BatchNorm."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, norm: Literal["group", "batch"] = "group",
                 groups: int = 2):
        super().__init__()
        _need_image("resnet20", in_shape)
        if norm not in ("group", "batch") or groups < 1 or any(c % groups for c in (16, 32, 64)):
            raise ValueError(f"norm must be 'group' or 'batch' and groups must divide 16, 32 and 64; "
                             f"got norm={norm!r}, groups={groups}")
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False), _norm(norm, 16, groups), nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
