"""quanta: Quantum-informed Tensor Adaptation (Chen et al., NeurIPS 2024, arXiv 2406.00132).

The hidden size is factored into axes n_1..n_N (D = prod >= max(d_in, d_out)); x is zero-padded to D,
reshaped to the axes, one gate per unordered pair of axes is applied (pairs in ``itertools.combinations``
order over axes counted from the last), the result is flattened and cropped to d_out. Gate T_ab has
shape [n_b, n_a, n_b, n_a] = [out_b, out_a, in_b, in_a]. A frozen copy S of the initial gates makes the
update Δy = M(T)x - M(S)x exactly zero at the start (W itself is never touched until a merge).
"""
from __future__ import annotations

import itertools
import math
import string

import torch
from torch import nn


def default_dims(in_features: int, out_features: int, n_axes: int = 4) -> list[int]:
    return [math.ceil(max(in_features, out_features) ** (1 / n_axes) - 1e-9)] * n_axes


def axis_pairs(n_axes: int):
    """(a, b) pairs as negative axis indices: (-1,-2), (-1,-3), ..., (-2,-3), ..."""
    return list(itertools.combinations(range(-1, -n_axes - 1, -1), 2))


def einsum_string(n_axes: int) -> str:
    """The whole circuit as one einsum, e.g. 3 axes: ``...abc,efbc,diaf,ghde->...ghi``.

    Axis k carries letters alphabet[k], alphabet[k + N], alphabet[k + 2N], ...: each gate moves the
    two axes it touches to their next letter.
    """
    if n_axes * n_axes > len(string.ascii_letters):
        raise ValueError(f"quanta supports at most 7 axes, got {n_axes}")
    version = [0] * n_axes
    letter = lambda k: string.ascii_letters[k + version[k] * n_axes]  # noqa: E731
    state = "".join(letter(k) for k in range(n_axes))
    gates = []
    for a, b in axis_pairs(n_axes):
        a, b = a % n_axes, b % n_axes
        ins = letter(b) + letter(a)
        version[a] += 1
        version[b] += 1
        gates.append(letter(b) + letter(a) + ins)
    out = "".join(letter(k) for k in range(n_axes))
    return f"...{state},{','.join(gates)}->...{out}"


def apply_gates(x, gates, dims):
    """x [..., D] -> [..., D], gate by gate (each gate one two-operand einsum)."""
    n = len(dims)
    state = x.reshape(*x.shape[:-1], *dims)
    for gate, (a, b) in zip(gates, axis_pairs(n)):
        a, b = a % n, b % n
        letters = string.ascii_letters[:n]
        out = letters.replace(letters[a], "A").replace(letters[b], "B")
        state = torch.einsum(f"...{letters},BA{letters[b]}{letters[a]}->...{out}", state, gate)
    return state.reshape(*x.shape)


def circuit(x, gates, dims):
    """x [..., D] -> [..., D] with the single generated einsum (state contracted first)."""
    state = x.reshape(*x.shape[:-1], *dims)
    return torch.einsum(einsum_string(len(dims)), state, *gates).reshape(*x.shape)


def _chain(x, gates, dims):
    """The circuit as one 2-D matmul per gate, the axes left where the last gate put them.

    Returns the state [tokens, axes...] and ``order`` (which axis sits where). Only the two axes a gate acts
    on are moved last, so a gate costs at most one copy and its weight gradient is one plain GEMM.
    """
    n = len(dims)
    state, order = x.reshape(-1, *dims), list(range(n))
    for gate, (a, b) in zip(gates, axis_pairs(n)):
        a, b = a % n, b % n
        pa, pb = order.index(a), order.index(b)
        rest = [k for k in range(n) if k not in (pa, pb)]
        state = state.permute(0, *(1 + k for k in rest), 1 + pb, 1 + pa)
        order = [order[k] for k in rest] + [b, a]
        size = dims[a] * dims[b]
        state = (state.reshape(-1, size) @ gate.reshape(size, size).T).reshape(state.shape)
    return state, order


def _canonical(state, order, lead):
    return state.permute(0, *(1 + order.index(k) for k in range(len(order)))).reshape(*lead, -1)


def quanta_update(x, t_gates, s_gates, dims, pad: int, out_features: int):
    """Δy = M(T)x - M(S)x, cropped to ``out_features`` (both chains put the axes in the same order).

    Left eager: its GEMMs dominate, and torch.compile spent minutes on the permute chain (H100, torch 2.11).
    """
    if pad:
        x = nn.functional.pad(x, (0, pad))
    (state_t, order), (state_s, _) = _chain(x, t_gates, dims), _chain(x, s_gates, dims)
    return _canonical(state_t - state_s, order, x.shape[:-1])[..., :out_features]


def dense(gates, dims):
    """M with circuit(x) == M @ x: the circuit applied to the identity, transposed."""
    size = math.prod(dims)
    eye = torch.eye(size, dtype=gates[0].dtype, device=gates[0].device)
    return circuit(eye, gates, dims).T


class QuantaDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, dims=None, generator: torch.Generator | None = None):
        super().__init__()
        dims = list(dims) if dims else default_dims(in_features, out_features)
        if math.prod(dims) < max(in_features, out_features):
            raise ValueError(f"quanta dims {dims} multiply to {math.prod(dims)} < "
                             f"max(in, out) = {max(in_features, out_features)}")
        self.dims, self.in_features, self.out_features = dims, in_features, out_features
        self.T = nn.ParameterList()
        n = len(dims)
        for i, (a, b) in enumerate(axis_pairs(n)):
            size = dims[a] * dims[b]
            init = torch.empty(size, size)
            bound = 1 / math.sqrt(size)                      # kaiming_uniform(a=sqrt(5)) on a size x size matrix
            init.uniform_(-bound, bound, generator=generator)
            gate = init.reshape(dims[b], dims[a], dims[b], dims[a])
            self.T.append(nn.Parameter(gate.clone()))
            self.register_buffer(f"S{i}", gate.clone())

    @property
    def S(self):
        return [getattr(self, f"S{i}") for i in range(len(self.T))]

    def forward(self, x):
        return quanta_update(x, [t.float() for t in self.T], [s.float() for s in self.S], self.dims,
                             math.prod(self.dims) - x.shape[-1], self.out_features)

    def delta_weight(self):
        delta = dense([t.float() for t in self.T], self.dims) - dense([s.float() for s in self.S], self.dims)
        return delta[: self.out_features, : self.in_features]
