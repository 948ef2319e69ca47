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
from .tq import expval_update, real_form


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


def vqc_unitary_by_states(theta, n: int):
    """U(θ) by running the identity's columns through the layers: θ [..., L, 4, n] -> [..., 2^n, 2^n].

    For the expectation readout (n around 10) multiplying dense layer matrices costs 2L complex 2^n-cubed
    products a circuit; on the 2^n basis states each RY layer is two small Kronecker factors (2^(n/2) each)
    and each CRZ ring an elementwise phase, about 2^(n/2) times cheaper. Leading dims batch circuits.
    """
    first, second = ring_pairs(n)
    half, dim = n // 2, 2 ** n
    grid = (2 ** half, 2 ** (n - half))
    rot = sim.ry(theta[..., 0::2, :])                                            # [..., L, 2, n, 2, 2]
    ka = sim.kron_all(rot[..., :half, :, :]).to(sim.CDTYPE)                      # [..., L, 2, 2^half, 2^half]
    kb = sim.kron_all(rot[..., half:, :, :]).to(sim.CDTYPE)
    phases = torch.stack([theta[..., 1, :] @ sim.crz_phases(n, first, theta.device).T,
                          theta[..., 3, :] @ sim.crz_phases(n, second, theta.device).T], -2)  # [..., L, 2, 2^n]
    diag = torch.polar(torch.ones_like(phases), phases).unflatten(-1, grid).unsqueeze(-3)  # [..., L, 2, 1, a, b]
    batch = theta.shape[:-3]
    psi = torch.eye(dim, dtype=sim.CDTYPE, device=theta.device).reshape(dim, *grid).expand(*batch, dim, *grid)
    for layer in range(theta.shape[-3]):
        for sub in range(2):
            psi = torch.einsum("...tab,...ia,...jb->...tij", psi, ka[..., layer, sub, :, :], kb[..., layer, sub, :, :])
            psi = psi * diag[..., layer, sub, :, :, :]
    return psi.reshape(*batch, dim, dim).transpose(-1, -2)


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
        return ("vqc", self.readout, self.n_qubits, self.theta.shape[0])

    def batched_unitary(self, thetas):
        """Amplitude readout: U itself. Expectation readout: [Re U; Im U] for the real-matmul readout, built
        from the basis states and recomputed in backward (its intermediate states would be ~10 GB at n=10
        for the 64 layers of a 7B model on q_proj,v_proj)."""
        if self.readout == "amplitude":
            return vqc_unitary(thetas, self.n_qubits)
        if torch.is_grad_enabled():
            return real_form(checkpoint(vqc_unitary_by_states, thetas, self.n_qubits, use_reentrant=False))
        return real_form(vqc_unitary_by_states(thetas, self.n_qubits))

    def unitary(self):
        """What the readout multiplies by, as :meth:`batched_unitary` builds it (U, or [Re U; Im U])."""
        u = bank_unitary(self)
        if u is not None:
            return u
        return (vqc_unitary(self.theta.float(), self.n_qubits) if self.readout == "amplitude"
                else self.batched_unitary(self.theta.float()))

    def forward(self, x):
        if self.readout == "expval":
            return expval_update(x, self.A.float(), self.unitary(), self.scale * self.B.float(),
                                 sim.z_signs(self.n_qubits, x.device))
        return (x @ (self.unitary().real @ self.A.float()).T) @ (self.scale * self.B.float()).T

    def delta_weight(self):
        return self.scale * self.B.float() @ vqc_unitary(self.theta.float(), self.n_qubits).real @ self.A.float()
