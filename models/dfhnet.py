"""DFHNet: the attention backbone of DDH/DCDH for 32x32 face images.

Architecture and parameter names follow the authors' ``model.py`` so that their
released ``dcdh_<dataset><bits>.tar`` checkpoints load with ``load_state_dict``
(names and shapes are listed in ``shared/fixtures/reference_values.json``).
Paper: DCDH (Pattern Recognition 2021), Sec. 4.2 / Fig. 2, backbone inherited from DDH.
"""
import torch
import torch.nn as nn

FACE_FEATURES = 1024
"""Width of the face feature layer that feeds the hash layer."""


def _conv_bn_relu(cin, cout, kernel, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _deconv_relu(cin, cout):
    # 2x spatial upsampling: H -> 2H
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1,
                                            output_padding=1), nn.ReLU(inplace=True))


class DFHNet(nn.Module):
    """Attention-based hashing network for 3x32x32 inputs.

    Two branches on the input image: a mask branch (encoder 32->16->8->4,
    decoder back to 32 with skip connections, sigmoid) and a trunk branch
    (four 3x3/1x1 conv blocks). Their product plus the trunk goes through a
    conv stack whose last two stages are fused (2176 features) into a
    1024-d face feature layer and the hash layer (Linear + BatchNorm1d).

    Args:
        bits (int): code length K (> 0).

    Shapes:
        input ``x``: float32 (B, 3, 32, 32), DDH-normalised values in [-1, 1].
        output: float32 (B, K) real-valued codes ``h``; the binary code is sign(h).

    Raises:
        ValueError: if ``bits`` is not a positive integer.
    """

    def __init__(self, bits):
        super().__init__()
        if not isinstance(bits, int) or bits <= 0:
            raise ValueError(f"DFHNet: code length must be a positive integer, got {bits!r}")
        self.bits = bits
        # mask branch, encoder
        self.spatial_features_1 = _conv_bn_relu(3, 32, 2, 2)
        self.spatial_features_2 = _conv_bn_relu(32, 64, 2, 2)
        self.spatial_features_3 = _conv_bn_relu(64, 128, 2, 2)
        self.fc = _conv_bn_relu(128, 128, 1)
        # mask branch, decoder
        self.upscales_1 = _deconv_relu(128, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.upscales_2 = _deconv_relu(64, 32)
        self.bn2 = nn.BatchNorm2d(32)
        self.upscales_3 = _deconv_relu(32, 16)
        self.bn3 = nn.BatchNorm2d(16)  # present in the authors' model (and checkpoints), unused in forward
        self.bn3.requires_grad_(False)  # never gets a gradient (so DDP need not search for unused ones)
        self.upscales_4 = nn.Sequential(nn.Conv2d(16, 3, 1))
        # trunk branch
        self.attention_conv1 = _conv_bn_relu(3, 32, 3, 1, 1)
        self.attention_conv2 = _conv_bn_relu(32, 64, 3, 1, 1)
        self.attention_conv3 = _conv_bn_relu(64, 128, 3, 1, 1)
        self.attention_conv4 = _conv_bn_relu(128, 3, 1)
        # conv stack after the attention fusion
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 2), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 2), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )
        self.conv4 = _conv_bn_relu(128, 256, 2)
        self.face_features_layer = nn.Sequential(
            nn.Linear(128 * 3 * 3 + 256 * 2 * 2, FACE_FEATURES),
            nn.BatchNorm1d(FACE_FEATURES), nn.ReLU(inplace=True))
        self.hash_layer = nn.Sequential(nn.Linear(FACE_FEATURES, bits), nn.BatchNorm1d(bits))
        self._init_weights()

    def _init_weights(self):
        # The authors' initialisation: Xavier-normal weights, zero biases for
        # Conv2d, ConvTranspose2d and Linear; BatchNorm keeps PyTorch defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"DFHNet expects input of shape (B, 3, 32, 32), got {tuple(x.shape)}")
        m16 = self.spatial_features_1(x)
        m8 = self.spatial_features_2(m16)
        m4 = self.spatial_features_3(m8)
        mask = self.fc(m4)
        mask = self.bn1(self.upscales_1(mask) + m8)
        mask = self.bn2(self.upscales_2(mask) + m16)
        mask = torch.sigmoid(self.upscales_4(self.upscales_3(mask)))

        trunk = self.attention_conv4(self.attention_conv3(self.attention_conv2(self.attention_conv1(x))))
        fused = trunk + mask * trunk

        f3 = self.features(fused)   # (B, 128, 3, 3)
        f4 = self.conv4(f3)         # (B, 256, 2, 2)
        feats = torch.cat([f3.flatten(1), f4.flatten(1)], dim=1)
        return self.hash_layer(self.face_features_layer(feats))
