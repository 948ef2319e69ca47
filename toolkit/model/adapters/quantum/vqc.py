"""vqc: a variational circuit inside a low-rank sandwich, Δy = s · B · Re(U(θ)) · A · x (mergeable).

Ansatz per layer (VQNet's published circuit shape): RY(θ) on every wire, a CRZ ring (control i,
target i+1 mod n, for i = n-1 .. 0), RY(θ) on every wire, a CRZ ring (control i, target i-1 mod n,
in the order n-1, 0, 1, .., n-2). θ has shape [L, 4, n]: RY angles, ring-1 angles (in gate order),
RY angles, ring-2 angles. ``readout="expval"`` instead encodes RY(π·tanh(A·x)) and reads ⟨Z_k⟩ (not linear
in x, so not mergeable).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import simulator as sim
from .bank import bank_unitary
from .tq import encode


def ring_pairs(n: int):
    """(control, target) of the two CRZ rings, in the order they are applied."""
    first = [(i, (i + 1) % n) for i in range(n - 1, -1, -1)]
    second = [(i, (i - 1) % n) for i in [n - 1, *range(n - 1)]]
    return first, second


def vqc_circuit(theta, n: int):
    """Gate-by-gate circuit (the reference the closed form is tested against): state -> state."""
    first, second = ring_pairs(n)

    def circuit(state):
        for layer in theta:
            for ry_angles, ring_angles, pairs in ((layer[0], layer[1], first), (layer[2], layer[3], second)):
                for w in range(n):
                    state = sim.apply_1q(state, sim.ry(ry_angles[w]), w, n)
                for angle, (c, t) in zip(ring_angles, pairs):
                    state = sim.apply_controlled(state, sim.rz(angle), c, t, n)
        return state
    return circuit


def vqc_unitary(theta, n: int):
    """U(θ) in closed form: per layer D2·K2·D1·K1, K a Kronecker product of RYs, D a CRZ-ring diagonal.

    θ [..., L, 4, n] -> [..., 2^n, 2^n]: leading dims batch several circuits (one per adapted layer).
    """
    first, second = ring_pairs(n)
    k = sim.kron_all(sim.ry(theta[..., 0::2, :])).to(sim.CDTYPE)               # [..., L, 2, 2^n, 2^n]
    phases = torch.stack([theta[..., 1, :] @ sim.crz_phases(n, first, theta.device).T,
                          theta[..., 3, :] @ sim.crz_phases(n, second, theta.device).T], -2)  # [..., L, 2, 2^n]
    dk = torch.polar(torch.ones_like(phases), phases)[..., None] * k
    layers = dk[..., 1, :, :] @ dk[..., 0, :, :]                                 # [..., L, 2^n, 2^n]
    u = layers[..., 0, :, :]
    for layer in range(1, theta.shape[-3]):
        u = layers[..., layer, :, :] @ u
    return u


def vqc_expval(phi, theta, n: int):
    """⟨Z_k⟩ of U(θ)·ψ_enc(φ), applying the layers to the token states instead of building U.

    Building U costs L·8^n (n=10: 10 complex 1024³ matmuls a layer); on the states each RY layer is
    two small Kronecker factors (2^(n/2) each) and each CRZ ring an elementwise phase: T·L·2^n·2^(n/2+1).
    All in real arithmetic: the encoded state and the RY factors are real, so the state is kept as
    [Re; Im] (Im zero, and left out, until the first phase) and only the phases mix the two halves.
    """
    first, second = ring_pairs(n)
    half = n // 2
    rot = sim.ry(theta[:, 0::2])                                                # [L, 2, n, 2, 2]
    ka, kb = sim.kron_all(rot[..., :half, :, :]), sim.kron_all(rot[..., half:, :, :])  # [L, 2, 2^half, ...]
    phases = torch.stack([sim.crz_phases(n, first, theta.device) @ theta[:, 1].T,
                          sim.crz_phases(n, second, theta.device) @ theta[:, 3].T], 0).permute(2, 0, 1)
    grid = (2 ** half, 2 ** (n - half))
    cos, sin = torch.cos(phases).unflatten(-1, grid), torch.sin(phases).unflatten(-1, grid)  # [L, 2, a, b]
    psi = encode(phi)
    shape = psi.shape
    psi = psi.reshape(1, -1, *grid)                                             # [Re] or [Re, Im], tokens, a, b
    for layer in range(theta.shape[0]):
        for sub in range(2):
            psi = torch.einsum("ztab,ia,jb->ztij", psi, ka[layer, sub], kb[layer, sub])
            c, s = cos[layer, sub], sin[layer, sub]
            if psi.shape[0] == 1:
                psi = torch.cat([psi * c, psi * s])
            else:
                re, im = psi
                psi = torch.stack([re * c - im * s, re * s + im * c])
    prob = psi.square().sum(0)
    return prob.reshape(shape) @ sim.z_signs(n, phi.device)


class VQCDelta(nn.Module):
    """The update of one linear layer; ``delta_weight()`` is ΔW when the readout is linear."""

    def __init__(self, in_features: int, out_features: int, n_qubits: int = 3, n_layers: int = 4,
                 alpha: float | None = None, readout: str = "amplitude"):
        super().__init__()
        self.n_qubits, self.readout = n_qubits, readout
        width = 2 ** n_qubits if readout == "amplitude" else n_qubits
        self.scale = (alpha if alpha is not None else width) / width
        self.A = nn.Parameter(torch.empty(width, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, width))
        self.theta = nn.Parameter(torch.empty(n_layers, 4, n_qubits).uniform_(-math.pi, math.pi))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def bank_key(self):
        """Circuits with equal keys share one batched unitary build per model forward (bank.py)."""
        return ("vqc", self.n_qubits, self.theta.shape[0]) if self.readout == "amplitude" else None

    def batched_unitary(self, thetas):
        return vqc_unitary(thetas, self.n_qubits)

    def unitary(self):
        u = bank_unitary(self)
        return vqc_unitary(self.theta.float(), self.n_qubits) if u is None else u

    def forward(self, x):
        if self.readout == "expval":
            # 2^n amplitudes per token through 2L gate layers: recompute them in backward instead of keeping
            # them (at n=10 they are ~1 GB a layer for 2,048 tokens)
            phi, theta = torch.pi * torch.tanh(x @ self.A.float().T), self.theta.float()
            z = checkpoint(vqc_expval, phi, theta, self.n_qubits, use_reentrant=False) if torch.is_grad_enabled() \
                else vqc_expval(phi, theta, self.n_qubits)
            return z @ (self.scale * self.B.float()).T
        return (x @ (self.unitary().real @ self.A.float()).T) @ (self.scale * self.B.float()).T

    def delta_weight(self):
        return self.scale * self.B.float() @ vqc_unitary(self.theta.float(), self.n_qubits).real @ self.A.float()
