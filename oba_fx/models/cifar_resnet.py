"""CIFAR ResNets of He et al. 2016 (section 4.2), in the layout of the public pretrained weights.

The network is a 3x3 stem convolution (16 channels) with BN and ReLU, three stages of ``n``
BasicBlocks with 16, 32 and 64 channels (``depth = 6 n + 2``), global average pooling and a
``linear`` classifier.  The first block of stages 2 and 3 has stride 2.  Where a block changes the
shape, the shortcut is "option A": the input is subsampled with ``x[:, :, ::2, ::2]`` and its
channels are zero-padded, with no parameters.  That padding is done in the block's ``forward`` by a
plain ``F.pad`` call, so it shows up in a ``torch.fx`` graph as ``getitem`` + ``pad`` nodes.

Module names match the keys of the akamaster checkpoints once ``module.`` is stripped:
``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``.

Parameter counts (10 classes): ResNet-20 269,722; ResNet-32 464,154; ResNet-44 658,586;
ResNet-56 853,018; ResNet-110 1,727,962.

Example:
    >>> import torch
    >>> from oba_fx.models.cifar_resnet import resnet20
    >>> model = resnet20()
    >>> sum(p.numel() for p in model.parameters())
    269722
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from oba_fx.errors import BadInputError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (1 or 2).
        shortcut: What to do when the shape changes: ``"A"`` subsamples and zero-pads the
            channels (no parameters, He et al. option A); ``"B"`` uses a strided 1x1 conv + BN
            held in ``self.shortcut``.  Where the shape does not change the shortcut is the
            identity in both cases.

    Example:
        >>> import torch
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise BadInputError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Plain Python attributes fixed at construction: the forward branches on them, never on data.
        self.shortcut_kind = "identity"
        self.pad = 0
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                if stride != 2 or in_planes + 2 * (planes // 4) != planes:
                    raise BadInputError(
                        "option-A shortcut needs stride 2 and planes == 2 * in_planes, "
                        f"got in_planes={in_planes}, planes={planes}, stride={stride}"
                    )
                self.shortcut_kind = "A"
                self.pad = planes // 4
            else:
                self.shortcut_kind = "B"
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut_kind == "A":
            identity = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        elif self.shortcut_kind == "B":
            identity = self.shortcut(x)
        else:
            identity = x
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet with three stages of BasicBlocks.

    Args:
        depth: ``6 n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Outputs of ``linear``.
        widths: Channels of the three stages (the stem has ``widths[0]`` channels).
        shortcut: ``"A"`` (zero-pad, the thin models) or ``"B"`` (1x1 conv + BN).

    Example:
        >>> m = CifarResNet(8, num_classes=5)
        >>> [name for name, _ in m.named_children()]
        ['conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'linear']
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise BadInputError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        if len(widths) != 3:
            raise BadInputError(f"widths must have 3 entries, got {tuple(widths)}")
        n = (depth - 2) // 6
        self.depth = depth
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], n, 1, shortcut)
        self.layer2 = self._make_layer(widths[1], n, 2, shortcut)
        self.layer3 = self._make_layer(widths[2], n, 2, shortcut)
        self.linear = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Thin (16/32/64) option-A CIFAR ResNet of the given depth.

    Example:
        >>> sum(p.numel() for p in cifar_resnet(32).parameters())
        464154
    """
    return CifarResNet(depth, num_classes=num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (269,722 parameters with 10 classes)."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (464,154 parameters with 10 classes)."""
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (658,586 parameters with 10 classes)."""
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (853,018 parameters with 10 classes)."""
    return cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (1,727,962 parameters with 10 classes; no pretrained file is shipped)."""
    return cifar_resnet(110, num_classes)
