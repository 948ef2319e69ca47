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

from . import simulator as sim
from .tq import expval_readout


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
                    state = sim.apply_1q(state, sim.ry(ry_angles[w]), w)
                for angle, (c, t) in zip(ring_angles, pairs):
                    state = sim.apply_controlled(state, sim.rz(angle), c, t)
        return state
    return circuit


def vqc_unitary(theta, n: int):
    """U(θ) in closed form: per layer D2·K2·D1·K1, K a Kronecker product of RYs, D a CRZ-ring diagonal."""
    first, second = ring_pairs(n)
    k = sim.kron_all(sim.ry(theta[:, 0::2])).to(sim.CDTYPE)                    # [L, 2, 2^n, 2^n]
    phases = torch.stack([sim.crz_phases(n, first, theta.device) @ theta[:, 1].T,
                          sim.crz_phases(n, second, theta.device) @ theta[:, 3].T], 0)  # [2, 2^n, L]
    d = torch.polar(torch.ones_like(phases), phases).permute(2, 0, 1)           # [L, 2, 2^n]
    dk = d[..., None] * k
    layers = dk[:, 1] @ dk[:, 0]
    u = layers[0]
    for layer in layers[1:]:
        u = layer @ u
    return u


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
    def mergeable(self) -> bool:
        return self.readout == "amplitude"

    def unitary(self):
        return vqc_unitary(self.theta, self.n_qubits)

    def forward(self, x):
        u = self.unitary()
        if self.readout == "expval":
            return self.scale * expval_readout(torch.pi * torch.tanh(x @ self.A.T), u) @ self.B.T
        return (x @ (u.real @ self.A).T) @ (self.scale * self.B).T

    def delta_weight(self):
        return self.scale * self.B @ self.unitary().real @ self.A
