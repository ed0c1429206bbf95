"""DDHNet: the network of DDH (Jie Lin, Zechao Li, Jinhui Tang, "Discriminative Deep Hashing for
Scalable Face Image Retrieval", IJCAI 2017, Sec. 3.1 and Fig. 1) for 32x32 faces.
Reference code: xjcvip007/DDH ``DDH.py`` (Keras 1, ``build_DDN_net``; its header calls the method
DDQH). Written from the paper's description and a reading of that code; nothing is copied.

Layers (input 3x32x32; "valid" convolutions, stride 1; pooling 2x2, stride 2)::

    conv1  Conv 3->20, 3x3   BN ReLU  -> 20x30x30, max-pool -> 20x15x15
    conv2  Conv 20->40, 2x2  BN ReLU  -> 40x14x14, max-pool -> 40x7x7
    conv3  Conv 40->60, 2x2  BN ReLU  -> 60x6x6,   max-pool -> 60x3x3   ("pool3", 540 features)
    local4 locally connected 60->80, 2x2 (unshared weights per position) BN ReLU -> 80x2x2 (320)
    merge  [pool3, local4] -> 860 features
    face_features_layer  Linear 860 -> 4K, BN, ReLU
    divide_encode        K groups of 4 features, each a Linear 4 -> 1 (divide-and-encode) -> K
    hash_bn              BN, tanh -> u in (-1, 1)^K; the binary code is sign(u)

The softmax classifier and the loss are not part of the network (``methods.ddh``).

Parameters (weights and biases, BatchNorm scale and shift; running statistics are buffers), for K
bits and groups of 4: conv1 560 + 40, conv2 3,240 + 80, conv3 9,660 + 120, local4 76,800 + 320
(weights 4 positions x 80 x 60 x 2 x 2, one bias per filter and position, as Keras's
``LocallyConnected2D``) + 160, face features 860*4K + 4K + 8K, divide-and-encode 4K + K, hash BN
2K: in all ``90,980 + 3,459 K`` (132,488 at 12 bits, 257,012 at 48); ``tests/test_models_ddh.py``
checks the sum.

Differences from the reference code:

* BatchNorm uses PyTorch's defaults (eps 1e-5, momentum 0.1); Keras 1's are eps 1e-3 and a
  running-average momentum of 0.99 (0.01 in PyTorch's convention).
* The L2 penalty ``l2(1e-4)`` that Keras attaches to the kernels of the convolutions, the
  locally connected layer and the dense layers is the training recipe's weight decay here
  (``methods.ddh``), which the optimizer applies to every parameter.
* Initialisation: He-uniform for the convolutions and the locally connected layer (as the
  reference; for the locally connected kernel the fan-in is the patch size 60*2*2, where Keras 1,
  seeing a 3-d kernel, took the square root of the kernel's size, 277 vs 240), Glorot-uniform for
  the dense layers (Keras's default); zero biases.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_SIZE = 4
"""Features per bit of the divide-and-encode module (the reference's ``SPLIT_NUM``)."""


class LocallyConnected2d(nn.Module):
    """A convolution whose weights are not shared across positions ("valid", stride 1).

    Args: in_channels, out_channels, kernel_size (int), input_size (int, the square input's side).
    Parameters: ``weight`` (Ho, Wo, out, in, k, k), one filter bank per output position;
    ``bias`` (out, Ho, Wo). Computed as one unfold and one batched matrix product.

    Shapes: input (B, in, input_size, input_size) -> output (B, out, Ho, Wo), Ho = Wo =
    input_size - k + 1. Raises ValueError for an input of another shape.
    """

    def __init__(self, in_channels, out_channels, kernel_size, input_size):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.input_size = kernel_size, input_size
        self.output_size = input_size - kernel_size + 1
        if self.output_size < 1:
            raise ValueError(f"kernel {kernel_size} is larger than the input side {input_size}")
        s, k = self.output_size, kernel_size
        self.weight = nn.Parameter(torch.empty(s, s, out_channels, in_channels, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels, s, s))
        bound = math.sqrt(6.0 / (in_channels * k * k))  # He-uniform over the patch
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x):
        c, n = self.in_channels, self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, n, n):
            raise ValueError(f"LocallyConnected2d expects input of shape (B, {c}, {n}, {n}), got {tuple(x.shape)}")
        s = self.output_size
        patches = F.unfold(x, self.kernel_size)                       # (B, in*k*k, s*s), (c, kh, kw) order
        weight = self.weight.reshape(s * s, self.out_channels, -1)    # (s*s, out, in*k*k)
        out = torch.einsum("bpl,lop->bol", patches, weight)             # (B, out, s*s)
        return out.reshape(x.shape[0], self.out_channels, s, s) + self.bias

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_size}")


class DivideAndEncode(nn.Module):
    """DDH's divide-and-encode module: the input's K groups of ``group`` consecutive features are
    each mapped to one value by their own affine map (K independent Linear(group, 1)).

    Parameters: ``weight`` (K, group), ``bias`` (K,). Shapes: (B, K*group) -> (B, K).
    """

    def __init__(self, bits, group=GROUP_SIZE):
        super().__init__()
        self.bits, self.group = bits, group
        self.weight = nn.Parameter(torch.empty(bits, group))
        self.bias = nn.Parameter(torch.zeros(bits))
        bound = math.sqrt(6.0 / (group + 1))  # Glorot-uniform of each Linear(group, 1)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x):
        grouped = x.reshape(x.shape[0], self.bits, self.group)
        return (grouped * self.weight).sum(-1) + self.bias

    def extra_repr(self):
        return f"bits={self.bits}, group={self.group}"


def _conv_block(cin, cout, kernel):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2, 2))


class DDHNet(nn.Module):
    """DDH's hashing network for 3x32x32 inputs (layers in the module docstring).

    Args:
        bits (int): code length K (> 0).
        group (int): features per bit of the divide-and-encode module (4, the reference's).

    Shapes: input float32 (B, 3, 32, 32), DDH-normalised values in [-1, 1]; output float32
    (B, K), ``tanh`` outputs in (-1, 1); the binary code is sign(u).

    Raises: ValueError if ``bits`` or ``group`` is not a positive integer, or for an input of
    another shape.
    """

    def __init__(self, bits, group=GROUP_SIZE):
        super().__init__()
        for name, value in (("code length", bits), ("group size", group)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DDHNet: {name} must be a positive integer, got {value!r}")
        self.bits, self.group = bits, group
        self.conv1 = _conv_block(3, 20, 3)    # -> 20x15x15
        self.conv2 = _conv_block(20, 40, 2)   # -> 40x7x7
        self.conv3 = _conv_block(40, 60, 2)   # -> 60x3x3 (pool3)
        self.local4 = LocallyConnected2d(60, 80, 2, input_size=3)  # -> 80x2x2
        self.bn4 = nn.BatchNorm2d(80)
        self.face_features_layer = nn.Sequential(nn.Linear(60 * 3 * 3 + 80 * 2 * 2, group * bits),
                                                 nn.BatchNorm1d(group * bits), nn.ReLU(inplace=True))
        self.divide_encode = DivideAndEncode(bits, group)
        self.hash_bn = nn.BatchNorm1d(bits)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # He-uniform
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"DDHNet expects input of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        pool3 = self.conv3(self.conv2(self.conv1(x)))                 # (B, 60, 3, 3)
        local4 = F.relu(self.bn4(self.local4(pool3)))                 # (B, 80, 2, 2)
        merged = torch.cat([pool3.flatten(1), local4.flatten(1)], 1)  # (B, 860)
        return torch.tanh(self.hash_bn(self.divide_encode(self.face_features_layer(merged))))

