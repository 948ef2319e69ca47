"""tq: TorchQuantum-style encoder / layers / measurement (not mergeable).

φ = π·tanh(A·x) ∈ R^n, RY(φ_k) on wire k; L blocks of (U3 on every wire, then a CU3 ring on pairs
[k, (k+1) mod n]); z_k = ⟨Z_k⟩; Δy = s · B · z with s = alpha / n. ⟨Z⟩ is quadratic in the amplitudes,
so the update is not linear in x and there is no ΔW to merge.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import simulator as sim
from .bank import ThetaBank, bank_unitary
from .fused import compile_readout, compiled_on_cuda
from .readout import expval_readout_update


def encode(phi):
    """ψ_enc = ⊗_k (cos φ_k/2, sin φ_k/2): [..., n] -> [..., 2^n] (real), wire 0 the most significant.

    Built wire by wire as outer products (n-1 broadcast multiplies). A gather and ``prod`` over wires gave the
    same numbers, but ``prod``'s backward looks for zeros with a host sync, which stalled every GPU step.
    """
    halves = torch.stack([torch.cos(phi / 2), torch.sin(phi / 2)], -1)             # [..., n, 2]
    psi = halves[..., 0, :]
    for k in range(1, phi.shape[-1]):
        psi = (psi.unsqueeze(-1) * halves[..., k, None, :]).flatten(-2)
    return psi


def real_form(u):
    """[Re U; Im U] stacked: [..., 2·2^n, 2^n], so the readout needs real matmuls only."""
    return torch.cat([u.real, u.imag], -2)


def expval_readout(phi, u, real=None, signs=None):
    """z = |U ψ_enc(φ)|² · S: ⟨Z_k⟩ per wire after RY(φ) encoding and the circuit U; real matmuls only."""
    n = phi.shape[-1]
    psi = encode(phi) @ (real_form(u) if real is None else real).T                 # [..., 2 * 2^n]
    prob = psi.square().unflatten(-1, (2, 2 ** n)).sum(-2)                          # |Re|² + |Im|²
    return prob @ (sim.z_signs(n, phi.device) if signs is None else signs)


@compiled_on_cuda
def expval_update(x, a, real, b, signs):
    """Δy = B · ⟨Z⟩(U · ψ_enc(π·tanh(A·x))) for one layer, written for autograd: the reference that
    :class:`readout.ExpvalReadout` (what the adapters run) is tested against, and what ``TK_QUANTUM_COMPILE=1``
    compiles on CUDA."""
    return expval_readout(torch.pi * torch.tanh(x @ a.T), None, real, signs) @ b.T


def cu3_ring(n: int):
    return [(k, (k + 1) % n) for k in range(n)]


def tq_circuit(theta, n: int):
    """Gate-by-gate (reference) circuit; θ [L, 2, n, 3]: U3 angles per wire, CU3 angles per ring gate."""
    def circuit(state):
        for block in theta:
            for w in range(n):
                state = sim.apply_1q(state, sim.u3(*block[0, w]), w, n)
            for (c, t), angles in zip(cu3_ring(n), block[1]):
                state = sim.apply_controlled(state, sim.u3(*angles), c, t, n)
        return state
    return circuit


def tq_unitary(theta, n: int):
    """U(θ): the U3 layers as one Kronecker matrix each, then the CU3 ring, gate by gate, on the unitary's rows.

    θ [..., L, 2, n, 3] -> [..., 2^n, 2^n]: leading dims batch several circuits (one per adapted layer).
    A CU3 gate is one 4 x 4 matrix on its (control, target) pair, built for all gates at once, and applied as
    one two-operand einsum (a batched GEMM over the circuits): ~6 ops a gate forward and backward, where
    slicing on the control and applying the 2 x 2 gate elementwise took ~30 (this build runs once a step
    for all layers, but its ops are issued by the host one by one).
    """
    dim, batch = 2 ** n, theta.shape[:-4]
    gates = sim.u3(*theta.unbind(-1))                                          # [..., L, 2, n, 2, 2]
    u3_layers = sim.kron_all(gates[..., 0, :, :, :]).unbind(-3)                # L x [..., 2^n, 2^n]
    cu3 = controlled_4x4(gates[..., 1, :, :, :]).flatten(-6, -5).unbind(-5)    # L·n x [..., 2, 2, 2, 2]
    state = torch.eye(dim, dtype=sim.CDTYPE, device=theta.device).expand(*batch, dim, dim)  # rows: U^T so far
    for block, u3_layer in enumerate(u3_layers):
        state = (state @ u3_layer.transpose(-1, -2)).reshape(*batch, dim, *([2] * n))
        for k, (c, t) in enumerate(cu3_ring(n)):
            state = torch.einsum(_cu3_equation(n, c, t), cu3[block * n + k], state)
        state = state.reshape(*batch, dim, dim)
    return state.transpose(-1, -2)


def controlled_4x4(u):
    """[..., 2, 2] -> [..., 2, 2, 2, 2] = [out_c, out_t, in_c, in_t]: identity where the control is 0, u where 1."""
    one = torch.eye(2, dtype=u.dtype, device=u.device)
    p0, p1 = torch.diag(one[0]), torch.diag(one[1])
    return torch.einsum("ab,...ij->...aibj", p1, u) + torch.einsum("ab,ij->aibj", p0, one)


def _cu3_equation(n: int, c: int, t: int) -> str:
    """einsum applying a [out_c, out_t, in_c, in_t] gate to wires c, t of a state [..., rows, 2 (wire 0), ...]."""
    wires = "abcdefghijklmnop"[:n]
    out = wires.replace(wires[c], "C").replace(wires[t], "T")
    return f"...CT{wires[c]}{wires[t]},...x{wires}->...x{out}"


def measure(state_fn, phi, n: int):
    """⟨Z_k⟩ by simulating each token's encoded state gate by gate (reference for the fast path)."""
    out = []
    for token in phi:
        state = torch.zeros(1, *([2] * n), dtype=sim.CDTYPE)
        state[(0,) + (0,) * n] = 1
        for w in range(n):
            state = sim.apply_1q(state, sim.ry(token[w]), w, n)
        out.append(state_fn(state).reshape(-1).abs() ** 2)
    return torch.stack(out) @ sim.z_signs(n)


class TQDelta(ThetaBank, nn.Module):
    def __init__(self, in_features: int, out_features: int, n_qubits: int = 8, n_layers: int = 2,
                 alpha: float | None = None):
        super().__init__()
        self.n_qubits = n_qubits
        self.scale = (alpha if alpha is not None else n_qubits) / n_qubits
        self.A = nn.Parameter(torch.empty(n_qubits, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, n_qubits))
        self.theta = nn.Parameter(torch.empty(n_layers, 2, n_qubits, 3).uniform_(-math.pi, math.pi))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    @property
    def bank_key(self):
        return ("tq", self.n_qubits, self.theta.shape[0])

    def batched_unitary(self, thetas):
        return real_form(tq_unitary(thetas, self.n_qubits))

    def unitary(self):
        return tq_unitary(self.theta.float(), self.n_qubits)

    casts_input = True      # takes x in the base dtype: the readout node keeps it so and casts it itself

    def forward(self, x, out_dtype=None):
        real = bank_unitary(self)
        real = real_form(self.unitary()) if real is None else real
        return expval_delta(x, self.A.float(), real, self.B.float(), self.scale, self.n_qubits, out_dtype)


def expval_delta(x, a, real, b, scale, n, out_dtype=None):
    """The expectation readout of one layer (tq, and vqc with ``readout='expval'``): the eager node of
    readout.py, or, with ``TK_QUANTUM_COMPILE=1`` on CUDA, :func:`expval_update` compiled."""
    if compile_readout(x):
        out = expval_update(x.float(), a, real, scale * b, sim.z_signs(n, x.device))
    else:
        out = expval_readout_update(x, a, real, b, scale)
    return out.to(out_dtype or torch.float32)
