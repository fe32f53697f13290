"""The wide CIFAR models of the OBA paper's experiments (as in EigenDamage): ResNet-32 and VGG19-BN.

* ``wide_resnet32``: the He et al. CIFAR ResNet-32 layout (5 BasicBlocks per stage) with stages of
  64/128/256 channels and option-B shortcuts (strided 1x1 conv + BN) where the shape changes.
  7,427,914 parameters with 10 classes (7,451,044 with 100), i.e. the paper's "7.43 M".  With
  option-A (zero-pad) shortcuts instead it would have 7,386,186.
* ``vgg19_bn_cifar``: VGG19 convolutions (3x3, BN, ReLU; no conv bias since BN follows) with four
  2x2 max-pools, so a 32x32 input ends at 2x2x512; global average pooling, then one
  ``Linear(512, num_classes)``.  20,035,018 parameters with 10 classes (20,081,188 with 100), the
  paper's "20.0 M".

Both forwards are traceable by ``torch.fx.symbolic_trace``.

Example:
    >>> import torch
    >>> m = vgg19_bn_cifar()
    >>> m(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import CifarResNet

__all__ = ["VGGCifar", "VGG19_CFG", "vgg19_bn_cifar", "wide_resnet32"]

#: VGG19 layer configuration: channel counts, "M" = 2x2 max-pool.  The last stage has no pool:
#: global average pooling follows it.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512,
)  # fmt: skip


def wide_resnet32(num_classes: int = 10) -> CifarResNet:
    """Wide ResNet-32 (stages 64/128/256, option-B shortcuts): 7,427,914 parameters for 10 classes.

    Example:
        >>> sum(p.numel() for p in wide_resnet32().parameters())
        7427914
    """
    return CifarResNet(32, num_classes=num_classes, widths=(64, 128, 256), shortcut="B")


class VGGCifar(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` (Sequential), global avg pool, ``classifier``.

    Args:
        cfg: Channel counts and ``"M"`` for max-pools.
        num_classes: Outputs of ``classifier``.

    Example:
        >>> m = VGGCifar((8, "M", 16), num_classes=3)
        >>> m.classifier
        Linear(in_features=16, out_features=3, bias=True)
    """

    def __init__(self, cfg: tuple[int | str, ...] = VGG19_CFG, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(in_ch, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(),
                ]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg19_bn_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG19-BN for CIFAR: 20,035,018 parameters for 10 classes.

    Example:
        >>> sum(p.numel() for p in vgg19_bn_cifar().parameters())
        20035018
    """
    return VGGCifar(VGG19_CFG, num_classes=num_classes)
