"""torchvision ResNet-18/50 and AlexNet with a DCDH hash layer (Linear + BatchNorm1d to K bits).

``pretrained=True`` loads torchvision's ImageNet weights only when they are already in the
local torch hub cache (``torch.hub.get_dir()/checkpoints``); nothing is downloaded.
"""
import os

import torch
import torch.nn as nn
import torchvision.models as tvm

_WEIGHTS = {
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    "alexnet": (tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1),
}
MIN_IMAGE_SIZE = {"resnet18": 32, "resnet50": 32, "alexnet": 63}
"""Smallest square input each torchvision backbone accepts, in pixels."""


def _cached_weights(name):
    """Return the torchvision weights enum for ``name`` if its file is in the local cache.

    Raises:
        FileNotFoundError: the weights file is not in the torch hub cache.
    """
    weights = _WEIGHTS[name][1]
    filename = os.path.basename(weights.url)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--pretrained: ImageNet weights for {name} are not in the local torch cache "
            f"(expected {path}); this project never downloads weights. Copy {filename} there "
            f"or train without --pretrained.")
    return weights


class TorchvisionHashNet(nn.Module):
    """A torchvision classifier whose last layer is replaced by the hash layer.

    Args:
        name (str): 'resnet18', 'resnet50' or 'alexnet'.
        bits (int): code length K.
        pretrained (bool): start from ImageNet weights in the local cache.

    Shapes: input float32 (B, 3, S, S) with S >= MIN_IMAGE_SIZE[name]; output float32 (B, K).

    Raises:
        ValueError: unknown name or bad code length. FileNotFoundError: pretrained weights missing.
    """

    def __init__(self, name, bits, pretrained=False):
        super().__init__()
        if name not in _WEIGHTS:
            raise ValueError(f"unknown torchvision backbone {name!r}; expected one of {sorted(_WEIGHTS)}")
        if not isinstance(bits, int) or bits <= 0:
            raise ValueError(f"code length must be a positive integer, got {bits!r}")
        builder, _ = _WEIGHTS[name]
        net = builder(weights=_cached_weights(name) if pretrained else None)
        if name == "alexnet":
            width = net.classifier[-1].in_features
            net.classifier[-1] = nn.Identity()
        else:
            width = net.fc.in_features
            net.fc = nn.Identity()
        self.name = name
        self.bits = bits
        self.features = net
        self.hash_layer = nn.Sequential(nn.Linear(width, bits), nn.BatchNorm1d(bits))

    def forward(self, x):
        return self.hash_layer(self.features(x))
