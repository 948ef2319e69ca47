"""bitsandbytes 4-bit linears as plain torch ops, so ``torch.compile`` sees through them.

A compiled QLoRA step on an H100 was bound by the host, not the GPU: every ``bnb.nn.Linear4bit`` call
goes through bitsandbytes' Python wrapper and custom op (about 170 us of CPU each, 448 calls a 7B step,
which left the GPU idle half the step). Written as torch ops, the dequantization (4-bit codes times the
blockwise scales, with the scales themselves 8-bit in double quantization) becomes one generated
kernel inside each compiled transformer block, and the matmul a plain cuBLAS call.

The math is bitsandbytes' own (its reference implementation in ``backends/default/ops.py``): each byte
holds two 4-bit codes, high nibble first; value = code_table[nibble] * absmax[block], computed in
fp32 and rounded once to the compute dtype. Eagerly on a CPU the weights come out bit for bit as
``bitsandbytes.functional.dequantize_4bit`` gives them (tested).

Eagerly, the weight is never kept dequantized: the backward dequantizes it again (what bitsandbytes'
own ``MatMul4Bit`` does). Compiled, Inductor's partitioner may instead keep the bf16 weight of the layer
being differentiated for its backward (measured on the H100: it does); under gradient checkpointing that is
one transformer block's weights at a time (~0.4 GB for a 7B block); compiled without gradient checkpointing
it may be every layer's (not measured).
"""
from __future__ import annotations

import torch
from torch import nn


def dequantize(packed, code, absmax, absmax2, absmax2_code, offset, shape, blocksize: int, blocksize2: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The [out_features, in_features] weight in ``dtype`` from its packed 4-bit codes.

    ``absmax2``/``absmax2_code``/``offset`` are None unless the scales are double-quantized (8-bit scales
    with one fp32 scale per ``blocksize2`` of them, plus an offset).
    """
    if absmax2 is not None:
        scales = absmax2_code[absmax.long()]
        scales = torch.cat([scales, scales.new_zeros(-scales.numel() % blocksize2)])
        absmax = (scales.view(-1, blocksize2) * absmax2.view(-1, 1)).reshape(-1)[: absmax.numel()] + offset
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1).long()
    values = code[nibbles]
    n = shape[0] * shape[1]
    values = torch.cat([values[:n], values.new_zeros(-n % blocksize)])
    weight = (values.view(-1, blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:n]
    return weight.to(dtype).view(shape[0], shape[1])


class _Linear4bit(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (saved: the 4-bit state only)."""

    @staticmethod
    def forward(ctx, x, bias, packed, code, absmax, absmax2, absmax2_code, offset, shape, blocksize, blocksize2):
        ctx.save_for_backward(packed, code, absmax, absmax2, absmax2_code, offset)
        ctx.sizes = shape, blocksize, blocksize2
        weight = dequantize(packed, code, absmax, absmax2, absmax2_code, offset, *ctx.sizes, x.dtype)
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize(*ctx.saved_tensors, *ctx.sizes, grad.dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_bias) + (None,) * 9


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``bnb.nn.Linear4bit.forward`` (same compute-dtype handling)."""
    dtype = x.dtype
    compute = self.compute_dtype or dtype
    bias = None if self.bias is None else self.bias.to(compute)
    y = _Linear4bit.apply(x.to(compute), bias, self.nf4_packed, self.nf4_code, self.nf4_absmax, self.nf4_absmax2,
                          self.nf4_absmax2_code, self.nf4_offset, self.nf4_shape, self.nf4_blocksize,
                          self.nf4_blocksize2)
    return y.to(dtype)


def _register(module: nn.Module) -> None:
    """The packed weight and its quantization state as plain tensor attributes of the module (not
    buffers: DeepSpeed would cast fp32 buffers to bf16 and DDP would broadcast them every step). Plain
    tensors, not bitsandbytes' tensor subclass, are what torch.compile takes as graph inputs, so the
    layers of a model share one compiled graph."""
    state = module.weight.quant_state
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"unknown 4-bit quant_type {state.quant_type!r}")
    if len(state.shape) != 2:
        raise ValueError(f"4-bit weight of shape {tuple(state.shape)}: expected [out_features, in_features]")
    module.nf4_packed = module.weight.data.view(torch.uint8).view(-1)
    module.nf4_code = state.code.float()
    module.nf4_absmax = state.absmax
    # the double quantization's state, or None where the scales are plain fp32
    module.nf4_absmax2 = state.state2.absmax.float() if state.nested else None
    module.nf4_absmax2_code = state.state2.code.float() if state.nested else None
    module.nf4_offset = (torch.as_tensor(state.offset, dtype=torch.float32, device=state.absmax.device)
                         if state.nested else None)
    module.nf4_shape = tuple(int(s) for s in state.shape)
    module.nf4_blocksize = int(state.blocksize)
    module.nf4_blocksize2 = int(state.state2.blocksize) if state.nested else 0


def use_torch_4bit(model: nn.Module) -> int:
    """Route every bitsandbytes ``Linear4bit`` of ``model`` through :class:`_Linear4bit`. Returns how many.

    Call it once the model sits on its device: the module keeps references to the quantization state's
    tensors, which a later move of the model would not follow. Weights, state dicts and checkpoints are
    unchanged (nothing is registered).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "nf4_shape"):
            _register(module)
            module.forward = _forward.__get__(module)
            count += 1
    return count
