"""``QuantumLinear``: a frozen base linear layer plus a circuit update Δy, computed in fp32 outside autocast."""
from __future__ import annotations

import torch
from torch import nn

from ....errors import UserError


class QuantumLinear(nn.Module):
    """y = base(x) + Δ(dropout(x)); the base layer (fp32, bf16, fp16 or 4-bit) is called as it is.

    Δ runs in fp32/complex64 with autocast off and outside torch.compile; its output is cast back
    to the base output's dtype. ``merge()`` folds ΔW into W when the update is linear in x.
    """

    def __init__(self, base_layer: nn.Linear, delta: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.base_layer, self.delta = base_layer, delta
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @torch.compiler.disable
    def _delta(self, x, dtype):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.dropout(x)
            if getattr(self.delta, "casts_input", False):   # fp32 inside, cast fused into its own copies
                return self.delta(x, out_dtype=dtype)
            return self.delta(x.float()).to(dtype)

    def forward(self, x):
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self._delta(x, y.dtype)

    @torch.no_grad()
    def _fold(self, sign: int) -> None:
        weight = self.base_layer.weight
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UserError(f"cannot merge into a {weight.dtype} (quantized) weight; load the base in float")
        delta = self.delta.delta_weight().to(weight.device)
        weight.copy_((weight.float() + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1)
            self.merged = False
