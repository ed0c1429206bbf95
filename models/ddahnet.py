"""DDAHNet: the two-branch attention-aware network of DDAH (Zhi Xiong, Bo Li, Xiaoyan Gu, Wen Gu,
Weiping Wang, "Discriminative Deep Attention-Aware Hashing for Face Image Retrieval", PRICAI 2019)
for 32x32 faces. Reference code: deephashface/DDAH ``model.py`` (class ``DDAH``), read for the
layers; written anew, nothing is copied. Module names follow the reference's.

Two parts, trained by two optimizers (``methods.ddah``):

* the **face spatial network** (``attention_modules``): an encoder 32->16->8->4
  (``spatial_features_1..3``, 2x2 stride-2 convolutions), ``fc`` (1x1), a decoder back to 32x32
  with skip connections (``upscales_1..3``, ``bn1``, ``bn2``) and ``upscales_4`` (1x1 to one
  channel): a spatial attention map, min-max normalised per image to [0, 1];
* the **attention-aware hash network** (``trunk_modules``), shared by both branches: a conv stack
  (``features``: 3->32 3x3, 32->64 2x2, 64->128 2x2, each BN ReLU max-pool -> 128x3x3) and
  ``conv4`` (128->256 2x2 -> 256x2x2); channel attention on each (``global_avgpooling_3`` /
  ``_4``: MLPs on the flattened maps, 1152->512->128 and 1024->512->256, min-max normalised per
  image, multiplying the channels); the two maps fused (2176 features) into
  ``face_features_layer`` (1024, BN, ReLU) and ``hash_layer`` (Linear 1024->K, BN).

Branch A runs the hash network on ``image * attention map``, branch B on the image itself. The
softmax classifier (the reference's ``classifier``: tanh, Linear K->C) is the method's
(``methods.ddah``), shared by both branches.

Output. Retrieval uses branch A, as the reference's ``compute_result`` does (the first output,
``hash_a``): in eval mode the network returns ``hash_a`` (B, K). In training mode it returns both
branches' codes side by side, ``[hash_a, hash_b]`` (B, 2K), which is what DDAH's loss needs; so
only ``--method ddah`` trains this network (``TWO_BRANCH_BACKBONES`` in ``models``).
``branch_parameters()`` gives each part's parameters, for the two optimizers.

Parameters (weights and biases, BatchNorm scale and shift) for K bits: spatial network 155,873
(``bn3``, 32, is kept for the reference's layout but unused and frozen, as in DFHNet), hash network
3,717,760 + 1,027 K; in all 3,873,633 + 1,027 K (3,885,957 at 12 bits, 3,922,929 at 48), checked
layer by layer in ``tests/test_models_ddh.py``.

Differences from the reference code:

* ``bn1`` and ``bn2`` (in the spatial network's decoder) are optimised with the spatial network;
  the reference lists neither in either optimizer, so their scale and shift stay at 1 and 0.
* The min-max normalisations divide by ``max(max - min, 1e-12)``, so a constant map gives 0
  instead of NaN.
* In eval mode branch B is not computed (retrieval does not read it).
"""
import torch
import torch.nn as nn

FACE_FEATURES = 1024
"""Width of the face feature layer that feeds the hash layer."""

ATTENTION_MODULES = ("spatial_features_1", "spatial_features_2", "spatial_features_3", "fc",
                     "upscales_1", "bn1", "upscales_2", "bn2", "upscales_3", "bn3", "upscales_4")
"""The face spatial network's submodules (DDAH's first optimizer)."""
TRUNK_MODULES = ("features", "conv4", "global_avgpooling_3", "global_avgpooling_4",
                 "face_features_layer", "hash_layer")
"""The attention-aware hash network's submodules (DDAH's second optimizer, with the classifier)."""


def _conv_bn_relu(cin, cout, kernel, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _deconv_relu(cin, cout):
    # 2x spatial upsampling: H -> 2H
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1),
                         nn.ReLU(inplace=True))


def _min_max(t):
    """``t`` scaled per sample (over all but the first dimension) to [0, 1]."""
    flat = t.flatten(1)
    low = flat.amin(1).reshape((-1,) + (1,) * (t.dim() - 1))
    high = flat.amax(1).reshape((-1,) + (1,) * (t.dim() - 1))
    return (t - low) / (high - low).clamp_min(1e-12)


class DDAHNet(nn.Module):
    """DDAH's two-branch attention-aware hashing network for 3x32x32 inputs (module docstring).

    Args: bits (int): code length K (> 0).

    Shapes: input float32 (B, 3, 32, 32), DDH-normalised values in [-1, 1]. Output: eval mode
    float32 (B, K), branch A's codes (the retrieval codes; binary code = sign); training mode
    (B, 2K), branch A's codes then branch B's.

    Raises: ValueError if ``bits`` is not a positive integer or for an input of another shape.
    """

    def __init__(self, bits):
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or bits <= 0:
            raise ValueError(f"DDAHNet: code length must be a positive integer, got {bits!r}")
        self.bits = bits
        # face spatial network: encoder, decoder with skips, one-channel map
        self.spatial_features_1 = _conv_bn_relu(3, 32, 2, 2)
        self.spatial_features_2 = _conv_bn_relu(32, 64, 2, 2)
        self.spatial_features_3 = _conv_bn_relu(64, 128, 2, 2)
        self.fc = _conv_bn_relu(128, 128, 1)
        self.upscales_1 = _deconv_relu(128, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.upscales_2 = _deconv_relu(64, 32)
        self.bn2 = nn.BatchNorm2d(32)
        self.upscales_3 = _deconv_relu(32, 16)
        self.bn3 = nn.BatchNorm2d(16)  # in the reference's layout, unused in its forward
        self.bn3.requires_grad_(False)
        self.upscales_4 = nn.Sequential(nn.Conv2d(16, 1, 1))
        # attention-aware hash network (both branches)
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 2), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2))
        self.conv4 = _conv_bn_relu(128, 256, 2)
        self.global_avgpooling_3 = nn.Sequential(nn.Linear(128 * 3 * 3, 512), nn.ReLU(inplace=True),
                                                 nn.Linear(512, 128))
        self.global_avgpooling_4 = nn.Sequential(nn.Linear(256 * 2 * 2, 512), nn.ReLU(inplace=True),
                                                 nn.Linear(512, 256))
        self.face_features_layer = nn.Sequential(nn.Linear(128 * 3 * 3 + 256 * 2 * 2, FACE_FEATURES),
                                                 nn.BatchNorm1d(FACE_FEATURES), nn.ReLU(inplace=True))
        self.hash_layer = nn.Sequential(nn.Linear(FACE_FEATURES, bits), nn.BatchNorm1d(bits))
        # the reference's initialisation: Xavier-normal weights, zero biases; BatchNorm defaults
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def attention_map(self, x):
        """The face spatial network's map, (B, 1, 32, 32), min-max normalised per image to [0, 1]."""
        m16 = self.spatial_features_1(x)
        m8 = self.spatial_features_2(m16)
        mask = self.fc(self.spatial_features_3(m8))
        mask = self.bn1(self.upscales_1(mask) + m8)
        mask = self.bn2(self.upscales_2(mask) + m16)
        return _min_max(self.upscales_4(self.upscales_3(mask)))

    def hash_codes(self, x):
        """The attention-aware hash network on ``x`` (B, 3, 32, 32): real-valued codes (B, K)."""
        f3 = self.features(x)    # (B, 128, 3, 3)
        f4 = self.conv4(f3)      # (B, 256, 2, 2)
        a3 = _min_max(self.global_avgpooling_3(f3.flatten(1)))
        a4 = _min_max(self.global_avgpooling_4(f4.flatten(1)))
        fused = torch.cat([(f3 * a3[:, :, None, None]).flatten(1), (f4 * a4[:, :, None, None]).flatten(1)], 1)
        return self.hash_layer(self.face_features_layer(fused))

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"DDAHNet expects input of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        hash_a = self.hash_codes(x * self.attention_map(x))
        if not self.training:
            return hash_a
        return torch.cat([hash_a, self.hash_codes(x)], 1)

    def branch_parameters(self):
        """``{"attention": [...], "trunk": [...]}``: the trainable parameters of the face spatial
        network and of the attention-aware hash network (DDAH's two optimizers)."""
        def params(names):
            return [p for name in names for p in getattr(self, name).parameters() if p.requires_grad]
        return {"attention": params(ATTENTION_MODULES), "trunk": params(TRUNK_MODULES)}
