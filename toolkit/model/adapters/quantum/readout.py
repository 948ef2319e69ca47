"""The expectation readout of tq and vqc (``readout='expval'``) as one eager autograd node with few ops.

Δy = s·B·z, z = ⟨Z⟩ of U·ψ_enc(φ), φ = π·tanh(A·x), ψ_enc = ⊗_k (cos φ_k/2, sin φ_k/2), z = |U ψ_enc|²·S,
with U given as [Re U; Im U] (real matmuls only). :func:`tq.expval_update` is the same thing written for
autograd; this node is what the adapters run (values and gradients equal it, tests/model/test_quantum_circuits).

Why a node: on a GPU the readout's cost is the host launching its small ops, once per adapted layer and
step (64 layers in a 7B model on q_proj,v_proj). Autograd dispatched ~95 ops a layer for tq (forward +
backward); this node ~50: ψ_enc is built by pairing neighbouring factors level by level (⌈log2 n⌉ products
instead of n - 1), s and the doubled sign table are folded into one cached constant, and the backward is
written out (no autograd graph inside, no ``prod``, no host sync). For backward it keeps x in its own dtype
(the base layer keeps it anyway), ψ_enc, U ψ_enc, the encoding's small factors and [tokens, n] tensors:
at n = 10 about 3.4k floats a token (13.5 KiB, 27 MiB a layer at 2,048 tokens), where the compiled
readout also kept x's fp32 copy (16 KiB a token at d 4,096). Recomputing U ψ_enc instead would save
8 KiB a token and cost a [T, 2^n] x [2^n, 2^(n+1)] GEMM a layer, which made the GPU-bound vqc expval
step slower.
"""
from __future__ import annotations

import functools
import math

import torch

from . import simulator as sim


@functools.lru_cache(maxsize=16)
def _offsets(device: torch.device):
    """(0, -π/2): cos(φ/2 + offsets) = (cos φ/2, sin φ/2)."""
    with torch.inference_mode(False):
        return torch.tensor([0.0, -math.pi / 2], device=device)


@functools.lru_cache(maxsize=64)
def _readout_signs(n: int, scale: float, device: torch.device):
    """scale·[S; S] [2·2^n, n]: ⟨Z⟩ of amplitudes given as [Re; Im], with the update's scale folded in."""
    with torch.inference_mode(False):
        signs = sim.z_signs(n, device)
        return torch.cat([signs, signs]) * scale


def encode_tree(units):
    """ψ_enc [T, 2^n] = ⊗_k units[:, k] from the wires' factors units [T, n, 2] (cos, sin of φ_k/2), wire 0 the
    most significant.

    Neighbouring factors are paired level by level (one broadcast product a level); a level with an odd
    count leaves its last factor aside (a tail), multiplied in at the end, latest tail first. Returns ψ_enc
    and the factors its backward needs: each level's input and, per tail, what it multiplied (the "head").
    The levels are small (the largest [T, 2^(n/2+1)]), a head at most half of ψ_enc (odd n).
    """
    levels, heads = [], []
    while units.shape[1] > 1:
        levels.append(units)
        pairs = units.shape[1] // 2
        left, right = units[:, 0:2 * pairs:2], units[:, 1:2 * pairs:2]
        units = _outer(left, right)
    psi = units[:, 0]
    for tail in reversed(_tails(levels)):
        heads.append(psi)
        psi = _outer(psi, tail)
    return psi, levels + heads


def _outer(left, right):
    return (left.unsqueeze(-1) * right.unsqueeze(-2)).flatten(-2)


def _tails(levels):
    return [units[:, -1] for units in levels if units.shape[1] % 2]


def _levels(n: int) -> int:
    """How many pairing levels n factors take (n -> n // 2 until one is left)."""
    return n.bit_length() - 1


def encode_tree_backward(grad, factors):
    """grad [T, 2^n] of ψ_enc -> the gradient of the factors, [T, n, 2]."""
    count = _levels(factors[0].shape[1])
    levels, heads = factors[:count], factors[count:]
    tails = _tails(levels)
    tokens, grad_tails = grad.shape[0], []
    for tail, head in zip(tails, reversed(heads)):                  # the last product first
        g = grad.view(tokens, head.shape[-1], tail.shape[-1])
        grad_tails.append(torch.matmul(head.unsqueeze(-2), g).squeeze(-2))
        grad = torch.matmul(g, tail.unsqueeze(-1)).squeeze(-1)
    grad = grad.unsqueeze(1)
    for units in reversed(levels):
        pairs, odd = divmod(units.shape[1], 2)
        left, right = units[:, 0:2 * pairs:2], units[:, 1:2 * pairs:2]
        g = grad.reshape(tokens, pairs, left.shape[2], right.shape[2])
        grad_left = torch.matmul(g, right.unsqueeze(-1)).squeeze(-1)
        grad_right = torch.matmul(left.unsqueeze(-2), g).squeeze(-2)
        grad = torch.stack([grad_left, grad_right], 2).flatten(1, 2)
        if odd:
            grad = torch.cat([grad, grad_tails.pop().unsqueeze(1)], 1)
    return grad


class ExpvalReadout(torch.autograd.Function):
    """x [T, d_in] (any float dtype), a [n, d_in], real [2·2^n, 2^n], b [d_out, n] (fp32), scale -> Δy [T, d_out]
    in fp32."""

    @staticmethod
    def forward(ctx, x, a, real, b, scale):
        with torch.autocast(x.device.type, enabled=False):
            n = a.shape[0]
            if n < 2:  # inject.py's MIN_QUBITS keeps users out; the tree encoding and its backward need a pair
                raise ValueError(f"the expectation readout needs at least 2 qubits, got {n}")
            t = torch.tanh(x.float() @ a.T)
            # (cos φ/2, sin φ/2) as cos(φ/2 - (0, π/2)): two ops for what cos, sin and a stack took three more
            units = torch.cos(torch.add(_offsets(x.device), t.unsqueeze(-1), alpha=math.pi / 2))   # [T, n, 2]
            psi, factors = encode_tree(units)
            amp = psi @ real.T                                        # [T, 2·2^n]: Re, Im of U ψ_enc
            z = amp.square() @ _readout_signs(n, float(scale), x.device)  # s·⟨Z⟩
            ctx.save_for_backward(x, a, real, b, t, z, psi, amp, *factors)
            ctx.scale = float(scale)
            return z @ b.T

    @staticmethod
    def backward(ctx, grad):
        x, a, real, b, t, z, psi, amp, *factors = ctx.saved_tensors
        need_x, need_a, need_real, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.float()
            grad_b = grad.T @ z if need_b else None
            grad_z = grad @ b                                         # [T, n]
            signs = _readout_signs(a.shape[0], 2 * ctx.scale, x.device)
            grad_amp = amp * (grad_z @ signs.T)                       # d(amp²)/d amp = 2·amp
            grad_real = grad_amp.T @ psi if need_real else None
            grad_x = grad_a = None
            if need_x or need_a:
                grad_units = encode_tree_backward(grad_amp @ real, factors)
                c, s = factors[0].unbind(-1)
                grad_half = torch.addcmul(grad_units[..., 1] * c, grad_units[..., 0], s, value=-1)  # d(c, s) = (-s, c)
                grad_h = torch.ops.aten.tanh_backward(grad_half, t).mul_(math.pi / 2)
                grad_x = (grad_h @ a).to(x.dtype) if need_x else None
                grad_a = grad_h.T @ x.float() if need_a else None
        return grad_x, grad_a, grad_real, grad_b, None


def expval_readout_update(x, a, real, b, scale):
    """Δy = scale·B·⟨Z⟩(U·ψ_enc(π·tanh(A·x))) in fp32 for x [..., d_in]; see :class:`ExpvalReadout`."""
    out = ExpvalReadout.apply(x.reshape(-1, x.shape[-1]), a, real, b, scale)
    return out.reshape(*x.shape[:-1], out.shape[-1])
