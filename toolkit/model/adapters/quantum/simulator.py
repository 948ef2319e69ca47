"""A small state-vector simulator in plain PyTorch (complex64), plus closed forms the adapters use.

State ``[B, 2, ..., 2]``: n wires, wire 0 the most significant bit. A 1-qubit gate is a contraction on
its wire's axis; a controlled gate acts on the slice where the control is 1. The circuit's unitary is
what the simulator does to the identity batch (:func:`circuit_unitary`). The adapters build their
unitaries with the vectorised closed forms below; the tests check those against this simulator.
"""
from __future__ import annotations

import functools

import torch

CDTYPE = torch.complex64


def _c(x):
    return x.to(CDTYPE) if not x.is_complex() else x


def ry(theta):
    """RY(θ) = [[cos θ/2, -sin θ/2], [sin θ/2, cos θ/2]]; θ of any shape -> [..., 2, 2] (real)."""
    c, s = torch.cos(theta / 2), torch.sin(theta / 2)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rz(theta):
    """RZ(θ) = diag(e^{-iθ/2}, e^{iθ/2})."""
    zero = torch.zeros_like(theta)
    a, b = torch.polar(torch.ones_like(theta), -theta / 2), torch.polar(torch.ones_like(theta), theta / 2)
    return torch.stack([torch.stack([a, _c(zero)], -1), torch.stack([_c(zero), b], -1)], -2)


def u3(theta, phi, lam):
    """U3(θ, φ, λ) = [[cos θ/2, -e^{iλ} sin θ/2], [e^{iφ} sin θ/2, e^{i(φ+λ)} cos θ/2]]."""
    c, s = _c(torch.cos(theta / 2)), _c(torch.sin(theta / 2))
    one = torch.ones_like(theta)
    el, ep, epl = torch.polar(one, lam), torch.polar(one, phi), torch.polar(one, phi + lam)
    return torch.stack([torch.stack([c, -el * s], -1), torch.stack([ep * s, epl * c], -1)], -2)


PAULI_X = torch.tensor([[0, 1], [1, 0]], dtype=CDTYPE)


def apply_1q(state, gate, wire: int, n: int):
    """Apply a 2x2 ``gate`` to ``wire`` of ``state`` [..., 2 (wire 0), ..., 2 (wire n-1)].

    ``gate`` may carry leading batch dims [G..., 2, 2]; they line up with the state's leading dims.
    Written out elementwise: as a batched [2, 2] @ [2, 1] matmul it ran as a badly tiled GEMM on a GPU.
    """
    s0, s1 = state.unbind(wire - n)
    g = _c(gate).to(state.device)
    g = g.reshape(*g.shape[:-2], *([1] * (s0.dim() - g.dim() + 2)), 2, 2)
    return torch.stack([g[..., 0, 0] * s0 + g[..., 0, 1] * s1, g[..., 1, 0] * s0 + g[..., 1, 1] * s1], dim=wire - n)


def apply_controlled(state, gate, control: int, target: int, n: int):
    """Apply ``gate`` to ``target`` on the slice of ``state`` where ``control`` is 1."""
    s0, s1 = state.unbind(control - n)
    s1 = apply_1q(s1, gate, target if target < control else target - 1, n - 1)
    return torch.stack([s0, s1], dim=control - n)


def circuit_unitary(circuit, n: int, device=None):
    """U with ``circuit(state) == U @ state``: the circuit run on the identity batch, reshaped, transposed."""
    dim = 2 ** n
    eye = torch.eye(dim, dtype=CDTYPE, device=device).reshape(dim, *([2] * n))
    return circuit(eye).reshape(dim, dim).T


# ---- closed forms (vectorised; no per-gate autograd graph) ----------------------------------------

def bits(n: int, device=None):
    """[2^n, n] with bits[j, k] = bit k of j, wire 0 the most significant (cached: a constant per device)."""
    return _bits(n, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _bits(n: int, device: torch.device):
    with torch.inference_mode(False):  # a cached constant must stay usable outside inference mode
        j = torch.arange(2 ** n, device=device)
        return ((j[:, None] >> (n - 1 - torch.arange(n, device=device))) & 1).float()


def kron_all(mats):
    """mats [..., n, 2, 2] -> [..., 2^n, 2^n]: kron(m_0, ..., m_{n-1}), wire 0 the most significant."""
    factors = mats.unbind(-3)              # one node whose backward stacks, not a zero-padded gradient a wire
    out = factors[0]
    for m in factors[1:]:
        out = torch.einsum("...ij,...kl->...ikjl", out, m)
        out = out.reshape(*out.shape[:-4], out.shape[-4] * 2, out.shape[-2] * 2)
    return out


def crz_phases(n: int, pairs, device=None):
    """[2^n, len(pairs)]: CRZ(θ_g) on (control, target) pairs is diag(exp(i · P @ θ)), P_jg = c_j (t_j - 1/2).

    CRZ is diagonal, so a ring of them collapses to one diagonal whatever the order.
    """
    b = bits(n, device)
    return torch.stack([b[:, c] * (b[:, t] - 0.5) for c, t in pairs], dim=1)


def z_signs(n: int, device=None):
    """S [2^n, n] with S_jk = 1 - 2·bit_k(j): ⟨Z_k⟩ = |ψ|² · S (cached)."""
    return _z_signs(n, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _z_signs(n: int, device: torch.device):
    with torch.inference_mode(False):
        return 1 - 2 * _bits(n, device)
