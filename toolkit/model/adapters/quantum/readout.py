"""The expectation readout of tq and vqc (``readout='expval'``) as one eager autograd node with few ops.

Δy = s·B·z, z = ⟨Z⟩ of U·ψ_enc(φ), φ = π·tanh(A·x), ψ_enc = ⊗_k (cos φ_k/2, sin φ_k/2), z = |U ψ_enc|²·S,
with U given as [Re U; Im U] (real matmuls only). :func:`tq.expval_update` is the same thing written for
autograd; this node is what the adapters run (values and gradients equal it, tests/model/test_quantum_circuits).

Why a node: on a GPU the readout's cost is the host launching its small ops, once per adapted layer and
step (64 layers in a 7B model on q_proj,v_proj). Autograd dispatched ~95 ops a layer for tq (forward +
backward); this node ~50: ψ_enc is built by pairing neighbouring factors level by level (⌈log2 n⌉ products
instead of n - 1), s and the doubled sign table are folded into one cached constant, and the backward is
written out (no autograd graph inside, no ``prod``, no host sync). It keeps x in its own dtype and [tokens, n]
tensors only, and recomputes ψ_enc and U ψ_enc in backward (one more GEMM), so the 2^n-wide states are
never kept: ~16 MiB a layer at 2,048 tokens, d 4,096, bf16 x.
"""
from __future__ import annotations

import functools
import math

import torch

from . import simulator as sim


@functools.lru_cache(maxsize=64)
def _readout_signs(n: int, scale: float, device: torch.device):
    """scale·[S; S] [2·2^n, n]: ⟨Z⟩ of amplitudes given as [Re; Im], with the update's scale folded in."""
    with torch.inference_mode(False):
        signs = sim.z_signs(n, device)
        return torch.cat([signs, signs]) * scale


def encode_tree(c, s):
    """ψ_enc [T, 2^n] = ⊗_k (c_k, s_k) from c, s [T, n], wire 0 the most significant.

    Neighbouring factors are paired level by level (one broadcast product a level); a level with an odd
    count leaves its last factor aside (a tail), multiplied in at the end, latest tail first. Returns ψ_enc
    and what :func:`encode_tree_backward` needs.
    """
    units = torch.stack([c, s], -1)                                  # [T, n, 2]
    levels, tails, heads = [], [], []
    while units.shape[1] > 1:
        pairs, odd = divmod(units.shape[1], 2)
        if odd:
            tails.append(units[:, -1])
        left, right = units[:, 0:2 * pairs:2], units[:, 1:2 * pairs:2]
        levels.append((left, right, odd))
        units = (left.unsqueeze(-1) * right.unsqueeze(-2)).flatten(-2)
    psi = units[:, 0]
    for tail in reversed(tails):
        heads.append(psi)
        psi = (psi.unsqueeze(-1) * tail.unsqueeze(-2)).flatten(-2)
    return psi, (levels, tails, heads)


def encode_tree_backward(grad, saved):
    """grad [T, 2^n] of ψ_enc -> the gradients of c and s, [T, n] each."""
    levels, tails, heads = saved
    tokens, grad_tails = grad.shape[0], []
    for tail, head in zip(tails, reversed(heads)):                  # the last product first
        g = grad.view(tokens, head.shape[-1], tail.shape[-1])
        grad_tails.append(torch.matmul(head.unsqueeze(-2), g).squeeze(-2))
        grad = torch.matmul(g, tail.unsqueeze(-1)).squeeze(-1)
    grad = grad.unsqueeze(1)
    for left, right, odd in reversed(levels):
        g = grad.reshape(tokens, left.shape[1], left.shape[2], right.shape[2])
        grad_left = torch.matmul(g, right.unsqueeze(-1)).squeeze(-1)
        grad_right = torch.matmul(left.unsqueeze(-2), g).squeeze(-2)
        grad = torch.stack([grad_left, grad_right], 2).flatten(1, 2)
        if odd:
            grad = torch.cat([grad, grad_tails.pop().unsqueeze(1)], 1)
    return grad[..., 0], grad[..., 1]


class ExpvalReadout(torch.autograd.Function):
    """x [T, d_in] (any float dtype), a [n, d_in], real [2·2^n, 2^n], b [d_out, n] (fp32), scale -> Δy [T, d_out]
    in fp32."""

    @staticmethod
    def forward(ctx, x, a, real, b, scale):
        with torch.autocast(x.device.type, enabled=False):
            n = a.shape[0]
            t = torch.tanh(x.float() @ a.T)
            half = t * (math.pi / 2)                                  # φ/2
            c, s = torch.cos(half), torch.sin(half)
            psi, _ = encode_tree(c, s)
            amp = psi @ real.T                                        # [T, 2·2^n]: Re, Im of U ψ_enc
            z = amp.square() @ _readout_signs(n, float(scale), x.device)  # s·⟨Z⟩
            ctx.save_for_backward(x, a, real, b, t, c, s, z)
            ctx.scale = float(scale)
            return z @ b.T

    @staticmethod
    def backward(ctx, grad):
        x, a, real, b, t, c, s, z = ctx.saved_tensors
        need_x, need_a, need_real, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.float()
            grad_b = grad.T @ z if need_b else None
            grad_z = grad @ b                                         # [T, n]
            psi, saved = encode_tree(c, s)                            # recomputed, not kept
            amp = psi @ real.T                                        # recomputed
            signs = _readout_signs(a.shape[0], 2 * ctx.scale, x.device)
            grad_amp = amp * (grad_z @ signs.T)                       # d(amp²)/d amp = 2·amp
            grad_real = grad_amp.T @ psi if need_real else None
            grad_x = grad_a = None
            if need_x or need_a:
                grad_c, grad_s = encode_tree_backward(grad_amp @ real, saved)
                grad_half = torch.addcmul(grad_s * c, grad_c, s, value=-1)   # d(c, s)/d(φ/2) = (-s, c)
                grad_h = torch.ops.aten.tanh_backward(grad_half, t).mul_(math.pi / 2)
                grad_x = (grad_h @ a).to(x.dtype) if need_x else None
                grad_a = grad_h.T @ x.float() if need_a else None
        return grad_x, grad_a, grad_real, grad_b, None


def expval_readout_update(x, a, real, b, scale):
    """Δy = scale·B·⟨Z⟩(U·ψ_enc(π·tanh(A·x))) in fp32 for x [..., d_in]; see :class:`ExpvalReadout`."""
    out = ExpvalReadout.apply(x.reshape(-1, x.shape[-1]), a, real, b, scale)
    return out.reshape(*x.shape[:-1], out.shape[-1])
