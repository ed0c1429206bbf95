"""SphereNet-20/64 hashing network for 112x112 aligned faces (the authors' VGGFace2 model).

Parameter names follow the authors' ``SphereNet_hashing`` so their checkpoints load.
The residual unit is conv-BN-PReLU twice with an identity shortcut; each stage starts
with a stride-2 conv-BN-PReLU (SphereFace, Liu et al. 2017, with BatchNorm).
Paper: DCDH Sec. 5.1 (VGGFace2 experiments).
"""
import torch.nn as nn

STAGE_UNITS = {20: (1, 2, 4, 1), 64: (3, 8, 16, 3)}
"""Residual units per stage for the supported depths."""


class ResidualUnit(nn.Module):
    """Two 3x3 conv-BN-PReLU layers plus identity; (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.prelu1 = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu2 = nn.PReLU(channels)

    def forward(self, x):
        y = self.prelu1(self.bn1(self.conv1(x)))
        return x + self.prelu2(self.bn2(self.conv2(y)))


def _stage(cin, cout, units):
    layers = [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.PReLU(cout)]
    layers += [ResidualUnit(cout) for _ in range(units)]
    return nn.Sequential(*layers)


class SphereNetHashing(nn.Module):
    """SphereNet backbone with a 512-d embedding and a K-bit hash layer.

    Args:
        num_layers (int): 20 or 64.
        bits (int): code length K (> 0).

    Shapes:
        input: float32 (B, 3, 112, 112), normalised with mean 0.5 / std 0.5.
        output: float32 (B, K) real-valued codes.

    Raises:
        ValueError: unsupported depth or non-positive code length.
    """

    def __init__(self, num_layers=20, bits=48):
        super().__init__()
        if num_layers not in STAGE_UNITS:
            raise ValueError(f"SphereNet depth must be one of {sorted(STAGE_UNITS)}, got {num_layers!r}")
        if not isinstance(bits, int) or bits <= 0:
            raise ValueError(f"SphereNet: code length must be a positive integer, got {bits!r}")
        self.bits = bits
        units = STAGE_UNITS[num_layers]
        widths = (3, 64, 128, 256, 512)
        self.layer1 = _stage(widths[0], widths[1], units[0])
        self.layer2 = _stage(widths[1], widths[2], units[1])
        self.layer3 = _stage(widths[2], widths[3], units[2])
        self.layer4 = _stage(widths[3], widths[4], units[3])
        self.drop = nn.Dropout()
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.bn = nn.BatchNorm1d(512)
        self.logits = nn.Linear(512, bits)
        self.bn_last = nn.BatchNorm1d(bits)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 112, 112):
            raise ValueError(f"SphereNet expects input of shape (B, 3, 112, 112), got {tuple(x.shape)}")
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.bn(self.fc(self.drop(x.flatten(1))))
        return self.bn_last(self.logits(x))
