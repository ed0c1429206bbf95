"""Hashing networks (networks only; the losses are in ``methods``).

``build_model(backbone, bits)`` is the one entry point the scripts use; ``infer_backbone``
recognises a network from a checkpoint's state_dict (the authors' files carry no config).
"""
from .ddahnet import DDAHNet
from .ddhnet import DDHNet
from .dfhnet import DFHNet
from .spherenet import STAGE_UNITS, SphereNetHashing
from . import torchvision_backbones
from .torchvision_backbones import MIN_IMAGE_SIZE, TorchvisionHashNet

__all__ = ["BACKBONES", "DEFAULT_IMAGE_SIZE", "MIN_IMAGE_SIZE", "TWO_BRANCH_BACKBONES", "DDAHNet", "DDHNet",
           "DFHNet", "SphereNetHashing", "TorchvisionHashNet", "build_model", "check_image_size",
           "check_pretrained", "infer_backbone"]

BACKBONES = ("dfhnet", "ddhnet", "ddahnet", "spherenet20", "spherenet64", "resnet18", "resnet50", "alexnet")
"""Backbone names accepted by ``--backbone``."""

DEFAULT_IMAGE_SIZE = {"dfhnet": 32, "ddhnet": 32, "ddahnet": 32, "spherenet20": 112, "spherenet64": 112,
                      "resnet18": 112, "resnet50": 112, "alexnet": 112}
"""Input side in pixels each backbone is trained on by default."""

FIXED_IMAGE_SIZE = {"dfhnet": 32, "ddhnet": 32, "ddahnet": 32, "spherenet20": 112, "spherenet64": 112}
"""Backbones that take one input size only."""

TWO_BRANCH_BACKBONES = ("ddahnet",)
"""Networks whose training-mode output holds two branches' codes side by side (B, 2K) (eval mode:
(B, K)); only a method that declares the network as its ``requires_backbone`` can train them."""


def check_image_size(backbone, image_size):
    """Raise ValueError when ``backbone`` cannot take square inputs of ``image_size`` pixels."""
    size = FIXED_IMAGE_SIZE.get(backbone)
    if size is not None and image_size != size:
        raise ValueError(f"--backbone {backbone} takes {size}x{size} inputs, got --image-size {image_size}")
    if backbone in MIN_IMAGE_SIZE and image_size < MIN_IMAGE_SIZE[backbone]:
        raise ValueError(f"--backbone {backbone} needs --image-size >= {MIN_IMAGE_SIZE[backbone]}, "
                         f"got {image_size}")


def build_model(backbone, bits, pretrained=False):
    """Build a hashing network.

    Args:
        backbone (str): one of ``BACKBONES``.
        bits (int): code length K > 0.
        pretrained (bool): torchvision backbones only; ImageNet weights from the local cache.

    Returns: nn.Module mapping float32 (B, 3, S, S) to float32 (B, K) (``TWO_BRANCH_BACKBONES``
    in training mode: (B, 2K)).

    Raises: ValueError for an unknown backbone, a bad code length or ``pretrained`` on a
    backbone without ImageNet weights; FileNotFoundError when cached weights are missing.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    if not isinstance(bits, int) or bits <= 0:
        raise ValueError(f"code length must be a positive integer, got {bits!r}")
    if pretrained:
        check_pretrained(backbone)
    if backbone == "dfhnet":
        return DFHNet(bits)
    if backbone == "ddhnet":
        return DDHNet(bits)
    if backbone == "ddahnet":
        return DDAHNet(bits)
    if backbone.startswith("spherenet"):
        return SphereNetHashing(int(backbone[len("spherenet"):]), bits)
    return TorchvisionHashNet(backbone, bits, pretrained=pretrained)


def check_pretrained(backbone, cache=False):
    """Raise ValueError unless ``backbone`` has ImageNet weights (``--pretrained``); with ``cache``
    also FileNotFoundError unless they are in the local torch cache (nothing is downloaded)."""
    if backbone not in MIN_IMAGE_SIZE:
        raise ValueError(f"--pretrained is only available for {', '.join(MIN_IMAGE_SIZE)}, not {backbone}")
    if cache:
        torchvision_backbones._cached_weights(backbone)


def infer_backbone(state_dict):
    """Recognise the backbone and code length of a network state_dict.

    Args: state_dict: mapping of parameter names to tensors (a checkpoint's ``backbone``).
    Returns: (backbone name, bits).
    Raises: ValueError if the names match no known network.
    """
    keys = set(state_dict)
    if "local4.weight" in keys and "divide_encode.weight" in keys:
        return "ddhnet", int(state_dict["divide_encode.weight"].shape[0])
    if "global_avgpooling_3.0.weight" in keys and "hash_layer.0.weight" in keys:  # before dfhnet: shares names
        return "ddahnet", int(state_dict["hash_layer.0.weight"].shape[0])
    if "hash_layer.0.weight" in keys and "spatial_features_1.0.weight" in keys:
        return "dfhnet", int(state_dict["hash_layer.0.weight"].shape[0])
    if "logits.weight" in keys and "layer1.0.weight" in keys:
        units = sum(1 for k in keys if k.startswith("layer3.") and k.endswith(".conv1.weight"))
        depth = {u[2]: d for d, u in STAGE_UNITS.items()}
        if units not in depth:
            raise ValueError(f"SphereNet state_dict with {units} units in stage 3 matches no known depth")
        return f"spherenet{depth[units]}", int(state_dict["logits.weight"].shape[0])
    if "hash_layer.0.weight" in keys and "features.fc.weight" not in keys:
        if "features.layer4.0.conv3.weight" in keys:
            return "resnet50", int(state_dict["hash_layer.0.weight"].shape[0])
        if "features.layer4.0.conv1.weight" in keys:
            return "resnet18", int(state_dict["hash_layer.0.weight"].shape[0])
        if "features.classifier.1.weight" in keys:
            return "alexnet", int(state_dict["hash_layer.0.weight"].shape[0])
    raise ValueError("the checkpoint's network matches none of: " + ", ".join(BACKBONES))
