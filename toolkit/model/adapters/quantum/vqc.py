"""vqc: a variational circuit inside a low-rank sandwich, Δy = s · B · Re(U(θ)) · A · x (mergeable).

Ansatz per layer (VQNet's published circuit shape): RY(θ) on every wire, a CRZ ring (control i,
target i+1 mod n, for i = n-1 .. 0), RY(θ) on every wire, a CRZ ring (control i, target i-1 mod n,
in the order n-1, 0, 1, .., n-2). θ has shape [L, 4, n]: RY angles, ring-1 angles (in gate order),
RY angles, ring-2 angles. ``readout="expval"`` instead encodes RY(π·tanh(A·x)) and reads ⟨Z_k⟩ (not linear
in x, so not mergeable).
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ....errors import UserError
from ....switches import new_or_old
from . import simulator as sim
from .bank import ThetaBank, bank_unitary
from .fused import circuit_matmul_precision
from .tq import expval_delta


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


def vqc_real_unitary(theta, n: int):
    """[Re U; Im U] of the vqc circuit, θ [..., L, 4, n] -> [..., 2·2^n, 2^n], for the expectation readout.

    The same numbers as ``real_form(vqc_unitary_by_states(θ))`` (within fp32 rounding), computed by
    :class:`_BasisColumns`: no elementwise phase passes and no permute copies in the loop, and a backward
    that walks the circuit in reverse instead of keeping (or recomputing) its 2L intermediate states.
    """
    first, second = ring_pairs(n)
    half, batch, layers = n // 2, theta.shape[:-3], theta.shape[-3]
    theta = theta.reshape(-1, *theta.shape[-3:]).permute(1, 2, 0, 3)            # [L, 4, C, n]: sublayers first
    circuits, grid = theta.shape[2], (2 ** half, 2 ** (n - half))
    rot = sim.ry(theta[:, 0::2])                                                 # [L, 2, C, n, 2, 2]
    ka = sim.kron_all(rot[..., :half, :, :])                                     # [L, 2, C, A, A] (real)
    kb = sim.kron_all(rot[..., half:, :, :])                                     # [L, 2, C, B, B] (real)
    phases = torch.stack([theta[:, 1] @ sim.crz_phases(n, first, theta.device).T,
                          theta[:, 3] @ sim.crz_phases(n, second, theta.device).T], 1)  # [L, 2, C, 2^n]
    diag = torch.polar(torch.ones_like(phases), phases).unflatten(-1, grid)      # D[a, b]: [L, 2, C, A, B]
    # per column b of the (a, b) grid, the ring's phases and the a-half's rotations are one complex matrix,
    # stored b-major ([B, C]) like the state (see _BasisColumns)
    m = diag.permute(0, 1, 4, 2, 3).unsqueeze(-1) * ka.unsqueeze(2)              # [L, 2, B, C, A, A]
    m = m.reshape(2 * layers, grid[1], circuits, grid[0], grid[0]).contiguous()
    out = _BasisColumns.apply(m, kb.reshape(2 * layers, circuits, grid[1], grid[1]).contiguous())
    return out.reshape(*batch, *out.shape[-2:])


class _BasisColumns(torch.autograd.Function):
    """The circuit applied to all 2^n basis states of C circuits at once, sublayer by sublayer.

    State X[b, c, a, t]: amplitude (a, b) (a = the first n//2 wires) of column t of circuit c, b outermost.
    A sublayer is D·(Ka ⊗ Kb): Kb acts on b as one batched real GEMM over the complex numbers' real view
    (Kb is real; batch = circuits, written back in place of the b-major layout), then for each (b, c) the
    complex matrix M_b = diag(D[:, b])·Ka acts on a: one batched complex GEMM. Every sublayer is unitary, so
    backward rebuilds each intermediate state from the next one (Y = M^H X, X' = Kb^T Y) while carrying the
    gradient back the same way: memory stays a few states.
    Why b-major: Kb's gradient, a [B, B] matrix per circuit, reduces over 2·2^n·A numbers (65,536 at n = 10).
    As one batched GEMM a circuit that is 64 tiles of 32 x 32 each reducing 65,536 long (cuBLAS has no
    split-K for batched GEMMs): 2.0 ms a sublayer on an H100, 38 ms a 7B step. With b outermost, (circuit,
    chunk of the reduction) is a single batch stride, so it runs as C·S small GEMMs (split-K by hand, S
    chunks of :data:`KB_CHUNK`) and a sum over S.
    Inputs: m [S, B, C, A, A] complex, kb [S, C, B, B] real (S = 2L sublayers, C circuits); output
    [Re U; Im U] [C, 2·2^n, 2^n].
    """

    @staticmethod
    def forward(ctx, m, kb):
        with circuit_matmul_precision():
            return _BasisColumns._forward(ctx, m, kb)

    @staticmethod
    def backward(ctx, grad):
        with circuit_matmul_precision():
            return _BasisColumns._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, m, kb):
        m, kb = m.contiguous(), kb.contiguous()
        sub, bb, c, aa, _ = m.shape
        cols = aa * bb
        x = (m[0, :, :, :, :, None] * kb[0].transpose(0, 1)[:, :, None, None, :]).reshape(bb, c, aa, cols)  # on I
        kb_forward = _kb_forward_operands(kb)
        for s in range(1, sub):
            x = torch.view_as_complex(_kb_apply(kb_forward[s], torch.view_as_real(x)))
            x = (m[s].reshape(bb * c, aa, aa) @ x.reshape(bb * c, aa, cols)).reshape(bb, c, aa, cols)
        out = torch.view_as_real(x).permute(1, 4, 2, 0, 3).reshape(c, 2 * cols, cols)   # rows: (re/im, a, b)
        ctx.save_for_backward(m, kb, out)
        return out

    @staticmethod
    def _backward(ctx, grad):
        m, kb, out = ctx.saved_tensors
        sub, bb, c, aa, _ = m.shape
        cols = aa * bb

        def state(rows):                        # [C, 2·2^n, 2^n] -> complex [B, C, A, 2^n]
            return torch.view_as_complex(rows.reshape(c, 2, aa, bb, cols).permute(3, 0, 2, 4, 1).contiguous())

        x, g = state(out), state(grad)
        grad_m = torch.empty(m.shape, dtype=m.dtype, device=m.device)
        grad_kb = torch.empty(kb.shape, dtype=kb.dtype, device=kb.device)
        for s in range(sub - 1, 0, -1):
            ms = m[s].reshape(bb * c, aa, aa)
            y = ms.mH @ x.reshape(bb * c, aa, cols)            # the state before M (M is unitary)
            g_y = ms.mH @ g.reshape(bb * c, aa, cols)
            # y.mH: cuBLAS reads the conjugate transpose in place; CPU BLAS calls copy it first
            torch.matmul(g.reshape(bb * c, aa, cols), y.mH, out=grad_m[s].view(bb * c, aa, aa))
            y_real, g_y_real = (torch.view_as_real(t).view(bb, c, aa, cols, 2) for t in (y, g_y))
            kb_t = kb[s].mT                                     # Kb is orthogonal
            x_real = _kb_apply(kb_t, y_real)
            _kb_grad(g_y_real, x_real, out=grad_kb[s])          # Re(G_Y X^H) as real GEMMs
            x = torch.view_as_complex(x_real)
            g = torch.view_as_complex(_kb_apply(kb_t, g_y_real))
        g = g.reshape(bb * c, aa * aa, cols // aa)              # sublayer 0: X = m0[b, c, a, a0] · kb0[c, b, b0]
        kb0 = kb[0].transpose(0, 1).reshape(bb * c, bb, 1).to(g.dtype)
        torch.matmul(g, kb0, out=grad_m[0].view(bb * c, aa * aa, 1))
        grad_kb[0] = (m[0].conj().reshape(bb * c, 1, aa * aa) @ g).real.reshape(bb, c, bb).transpose(0, 1)
        return grad_m, grad_kb


# the length of each hand-made split-K chunk of Kb's gradient; TK_QUANTUM_KB_CHUNK=65536 at n = 10 gives one chunk
# (the single long GEMM a circuit of before), to compare on one machine
KB_CHUNK = 1024


def kb_chunk() -> int:
    """:data:`KB_CHUNK`, or ``TK_QUANTUM_KB_CHUNK`` where set (a whole number >= 1; anything else is one line)."""
    text = os.environ.get("TK_QUANTUM_KB_CHUNK")
    if text is None:
        return KB_CHUNK
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"TK_QUANTUM_KB_CHUNK={text!r} must be a whole number >= 1 (e.g. 1024, the default); "
                        f"unset it or fix the value")
    return int(text)


def kb_forward_transposed() -> bool:
    """Whether the forward's Kb GEMMs take Kb as a transposed view (default) or, with
    ``TK_QUANTUM_KB_FORWARD=plain``, as it is (the layout before 2026-11-23's fourth session), to compare on one
    machine; anything else is one line."""
    return new_or_old("TK_QUANTUM_KB_FORWARD", "transposed", "plain")


def _kb_forward_operands(kb):
    """Kb [S, C, B, B] as the forward's GEMM operands: transposed views of a contiguous copy of Kb^T (5 MiB at
    the 7B bench's 64 circuits, n = 10, 20 sublayers), so that each forward Kb GEMM is, for cuBLAS, the same
    problem as backward's (which multiply by Kb^T, a transposed view of Kb): same shapes, strides and
    transposes, operand 't' instead of 'n'. On the H100 backward's ran ``cutlass_80_simt_sgemm_128x32`` at
    396 µs a call, the forward's ``sm80_xmma_gemm_f32f32_f32f32_f32_nn_n_tilesize32x64`` at 474 µs (19 calls a
    step), each streaming the same 1 GiB (docs/quantum.md)."""
    return kb.mT.contiguous().mT if kb_forward_transposed() else kb


def _kb_apply(kb, x_real):
    """Y[b, c, ...] = sum_b' kb[c, b, b'] X[b', c, ...]: one batched GEMM over circuits (strided in and out).

    x_real [B, C, ...] real; returns a new [B, C, ...] tensor (same layout)."""
    bb, c = x_real.shape[:2]
    out = torch.empty(x_real.shape, dtype=x_real.dtype, device=x_real.device)
    torch.bmm(kb, x_real.reshape(bb, c, -1).transpose(0, 1), out=out.view(bb, c, -1).transpose(0, 1))
    return out


def _kb_grad(g_real, x_real, out):
    """out[c] = G[:, c] · X[:, c]^T over everything but (b, c), for G, X [B, C, ...] real: split-K by hand,
    C·S GEMMs over chunks of :data:`KB_CHUNK` numbers (one batch stride in the b-major layout), then a sum."""
    bb, c = g_real.shape[:2]
    length = g_real[0, 0].numel()
    chunks = max(1, length // kb_chunk())
    while length % chunks:                      # a divisor of the length (all sizes are powers of 2 here)
        chunks -= 1
    g_view = g_real.reshape(bb, c * chunks, length // chunks).transpose(0, 1)          # [C·S, B, K/S]
    x_view = x_real.reshape(bb, c * chunks, length // chunks).permute(1, 2, 0)         # [C·S, K/S, B]
    torch.sum((g_view @ x_view).view(c, chunks, bb, bb), 1, out=out)


class VQCDelta(ThetaBank, nn.Module):
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
        from the basis states by :func:`vqc_real_unitary`, whose backward walks the circuit in reverse (its
        intermediate states would be ~10 GB at n=10 for the 64 layers of a 7B model on q_proj,v_proj)."""
        if self.readout == "amplitude":
            return vqc_unitary(thetas, self.n_qubits)
        return vqc_real_unitary(thetas, self.n_qubits)

    def unitary(self):
        """What the readout multiplies by, as :meth:`batched_unitary` builds it (U, or [Re U; Im U])."""
        u = bank_unitary(self)
        if u is not None:
            return u
        return (vqc_unitary(self.theta.float(), self.n_qubits) if self.readout == "amplitude"
                else self.batched_unitary(self.theta.float()))

    casts_input = True      # takes x in the base dtype (the expectation readout node keeps it so for backward;
                            # the opt-in compiled CUDA readout is given x.float(), Inductor decides what it keeps)

    def forward(self, x, out_dtype=None):
        if self.readout == "expval":
            return expval_delta(x, self.A.float(), self.unitary(), self.B.float(), self.scale, self.n_qubits,
                                out_dtype)
        out = (x.float() @ (self.unitary().real @ self.A.float()).T) @ (self.scale * self.B.float()).T
        return out.to(out_dtype or torch.float32)

    def delta_weight(self):
        return self.scale * self.B.float() @ vqc_unitary(self.theta.float(), self.n_qubits).real @ self.A.float()
