"""quanta: Quantum-informed Tensor Adaptation (Chen et al., NeurIPS 2024, arXiv 2406.00132).

The hidden size is factored into axes n_1..n_N (D = prod >= max(d_in, d_out)); x is zero-padded to D,
reshaped to the axes, one gate per unordered pair of axes is applied (pairs in ``itertools.combinations``
order over axes counted from the last), the result is flattened and cropped to d_out. Gate T_ab has
shape [n_b, n_a, n_b, n_a] = [out_b, out_a, in_b, in_a]. A frozen copy S of the initial gates makes the
update Δy = M(T)x - M(S)x exactly zero at the start (W itself is never touched until a merge).
"""
from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
import string

import torch
from torch import nn

from .bank import bank_unitary
from .fused import circuit_matmul_precision


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
    """Reference chain: one 2-D matmul per gate, the two axes it acts on moved last (autograd builds the graph).

    Returns the state [tokens, axes...] and ``order`` (which axis sits where). Kept as the simple reference
    that :class:`_QuantaChains` (the adapter's path) is tested against.
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


def reference_update(x, t_gates, s_gates, dims, pad: int, out_features: int):
    """Δy = M(T)x - M(S)x by :func:`_chain` and autograd: the plain path the fused one must equal."""
    if pad:
        x = nn.functional.pad(x, (0, pad))
    (state_t, order), (state_s, _) = _chain(x, t_gates, dims), _chain(x, s_gates, dims)
    return _canonical(state_t - state_s, order, x.shape[:-1])[..., :out_features]


def quanta_update(x, t_gates, s_gates, dims, pad: int, out_features: int, out_dtype=None, fused=None, mats=None):
    """Δy = M(T)x - M(S)x, cropped to ``out_features``, in ``out_dtype`` (default: fp32).

    x may be in any float dtype; the math runs in fp32. On CUDA (``fused=None``) both circuits run as one
    hand-written autograd node (:class:`_QuantaChains`): the autograd version launched ~100 small ops per
    layer and a 7B step was bound by the CPU launching them. On a CPU that node is no faster than
    :func:`reference_update` (equal alone, 20% slower in a bf16 model step), so CPUs keep the reference. Both
    are eager: torch.compile spent minutes on the permute chain (H100, torch 2.11). ``TK_QUANTA_FUSED=1`` or
    ``=0`` picks one path on every device (to compare them). ``mats``: the fused node's oriented gate matrices
    when a bank built them for this step (:meth:`QuantaDelta.build_bank`), else built here.
    """
    if fused is None:
        fused = fused_default(x.is_cuda)
    if not fused:
        out = reference_update(x.float(), [t.float() for t in t_gates], [s.float() for s in s_gates], dims, pad,
                               out_features)
        return out.to(out_dtype or torch.float32)
    lead = x.shape[:-1]
    out = _QuantaChains.apply(x.reshape(-1, x.shape[-1]), tuple(dims), pad, out_features,
                              out_dtype or torch.float32, mats, len(t_gates), *t_gates, *s_gates)
    return out.reshape(*lead, out_features)


def fused_default(is_cuda: bool) -> bool:
    """The fused node on CUDA, the per-gate path elsewhere; ``TK_QUANTA_FUSED=1`` / ``=0`` force one."""
    return {"1": True, "0": False}.get(os.environ.get("TK_QUANTA_FUSED", ""), is_cuda)


TOKENS = -1   # the token axis in a layout


def plan(n_axes: int):
    """Layouts for the gate chain with the fewest full-state copies (cached per number of axes).

    A gate is one 2-D GEMM, with no copy, when its two axes sit together at either end of the state's
    memory layout: at the front it multiplies from the left ([pair, rest]), at the back from the right
    ([rest, pair]), and the GEMM may write its result with the pair at either end (cuBLAS writes a
    transposed product for free). Gates on disjoint axes may swap. Between gates a copy moves axes; the
    search (Dijkstra over layout and set of applied gates) finds the fewest copies: 4 for 4 axes where
    moving each gate's axes last took 5, 2 for 3 axes. Among plans with as many copies it prefers copies
    that keep a long innermost run in place (the token axis last, or 32+ elements), which read memory in
    order instead of gathering single floats; that counts the final copy to [tokens, axes...] too. Last, it
    prefers gates met in T's own (b, a) axis order: a gradient in the other order is copied into T's layout
    when autograd stores it (a small copy, but one more op a gate a layer for the host to issue).
    Steps: ("perm", new_layout) or ("gate", index, layout_in, layout_out, side_in, side_out).
    """
    return _plan(n_axes)


def _scattered(old, new) -> int:
    """1 when copying layout ``old`` to ``new`` keeps less than a long innermost run (the token axis, or
    two or more axes) in place, i.e. the copy reads single scattered floats; else 0."""
    kept = 0
    for a, b in zip(reversed(old), reversed(new)):
        if a != b:
            break
        if a == TOKENS:
            return 0
        kept += 1
    return 0 if kept >= 2 else 1


@functools.lru_cache(maxsize=16)
def _plan(n: int):
    pairs = [(a % n, b % n) for a, b in axis_pairs(n)]
    preds = [sum(1 << i for i in range(j) if set(pairs[i]) & set(pairs[j])) for j in range(len(pairs))]
    done, start = (1 << len(pairs)) - 1, (TOKENS, *range(n))
    if n > 4:          # the search grows fast; there, move each gate's two axes to the back (one copy a gate)
        return _greedy_plan(pairs, start)

    def available(mask):
        return [g for g in range(len(pairs)) if not mask >> g & 1 and preds[g] & mask == preds[g]]

    def moves(layout, mask):   # copies worth making: an available gate's pair to an end, the rest in any order
        out = set()
        for g in available(mask):
            for p in (pairs[g], pairs[g][::-1]):
                for rest in itertools.permutations(s for s in layout if s not in p):
                    out.update((p + rest, rest + p))
        out.discard(layout)
        return out

    copy, scattered = 100, 2   # a copy costs far more than a scattered one's extra, which costs more than a flip
    heap, seen, tie = [(0, 0, 0, start, ())], set(), itertools.count(1)
    while heap:
        cost, _, mask, layout, steps = heapq.heappop(heap)
        if mask == done:
            if steps and steps[-1] == "end":
                return steps[:-1]
            heapq.heappush(heap, (cost + scattered * _scattered(layout, start), next(tie), mask, layout,
                                  steps + ("end",)))
            continue
        if (layout, mask) in seen:
            continue
        seen.add((layout, mask))
        for g in available(mask):
            for side in ("L", "R"):
                pair = layout[:2] if side == "L" else layout[-2:]
                if set(pair) == set(pairs[g]):
                    rest = layout[2:] if side == "L" else layout[:-2]
                    for out in ("R", "L"):
                        new = pair + rest if out == "L" else rest + pair
                        flip = pair[0] != pairs[g][1]   # T's gradient then needs a copy into T's layout
                        heapq.heappush(heap, (cost + flip, next(tie), mask | 1 << g, new,
                                              steps + (("gate", g, layout, new, side, out),)))
        for new in moves(layout, mask):
            heapq.heappush(heap, (cost + copy + scattered * _scattered(layout, new), next(tie), mask, new,
                                  steps + (("perm", new),)))
    raise AssertionError("no plan")  # pragma: no cover


@functools.lru_cache(maxsize=16)
def _flipped(n: int):
    """Per gate: whether the fused node uses it with its pair in the (a, b) order, i.e. T_ab permuted."""
    pairs = [(a % n, b % n) for a, b in axis_pairs(n)]
    out = [False] * len(pairs)
    for step in plan(n):
        if step[0] == "gate":
            _, g, layout_in, _, side_in, _ = step
            pair = layout_in[:2] if side_in == "L" else layout_in[-2:]
            out[g] = pair[0] != pairs[g][1]
    return tuple(out)


def _greedy_plan(pairs, layout):
    steps = []
    for g, (a, b) in enumerate(pairs):
        new = tuple(s for s in layout if s not in (a, b)) + (b, a)
        if new != layout:
            steps.append(("perm", new))
        steps.append(("gate", g, new, new, "R", "R"))
        layout = new
    return tuple(steps)


def _sizes(layout, dims, tokens):
    return [tokens if s == TOKENS else dims[s] for s in layout]


def _stacked(t_gate, s_gate, pair, b_axis):
    """Gates T and S [n_b, n_a, n_b, n_a] as [2, out, in] fp32 matrices over the layout's pair order (one copy)."""
    size = t_gate.shape[0] * t_gate.shape[1]
    both = [t_gate.float(), s_gate.float()]
    return torch.stack(both if pair[0] == b_axis else [g.permute(1, 0, 3, 2) for g in both]).reshape(2, size, size)


class _QuantaChains(torch.autograd.Function):
    """Both circuits, M(T)x and M(S)x, in one autograd node over :func:`plan`'s layouts. Forward keeps the two
    states apart (plain GEMMs) so that only T's gate inputs are kept for backward, and x in its own dtype;
    backward carries both chains' gradients as one stacked state [2, layout...]: each gate one batched GEMM
    and each axis move one copy for both. T's gate gradients are plain 2-D GEMMs with the token axis as the
    (long) reduction, which keeps cuBLAS's split-K kernels (a batched weight-gradient GEMM lost them and
    ran 11x slower). S has no gradient; when x needs none either, only T's chain runs backward.
    """

    @staticmethod
    def forward(ctx, x, dims, pad, out_features, out_dtype, mats, n_gates, *gates):
        with circuit_matmul_precision(), torch.autocast(x.device.type, enabled=False):   # fp32 even if called under autocast
            return _QuantaChains._forward(ctx, x, dims, pad, out_features, out_dtype, mats, n_gates, *gates)

    @staticmethod
    def backward(ctx, grad):
        with circuit_matmul_precision():
            return _QuantaChains._backward(ctx, grad)

    @staticmethod
    def _forward(ctx, x, dims, pad, out_features, out_dtype, banked, n_gates, *gates):
        t_gates, s_gates = gates[:n_gates], gates[n_gates:]
        tokens = x.shape[0]
        program, final, _ = _program(tuple(dims), tokens)
        first = _padded_fp32(x, pad, dims)
        states, saved, stacked = [first, first], [], []
        for step in program:
            if step[0] == "perm":
                states = [state.permute(step[1]).contiguous() for state in states]
                continue
            _, g, side_in, side_out, size, _, out_sizes, pair, b_axis = step
            mats = banked[g] if banked is not None else _stacked(t_gates[g], s_gates[g], pair, b_axis)
            stacked.append(mats)
            # T's gate inputs only (its gradients need them); the first is x itself, kept in its own dtype
            saved.append(x if not saved else states[0])
            outs = []
            for state, mat in zip(states, mats):     # T and S: two plain GEMMs, separate states (S's not kept)
                inp = state.reshape(size, -1) if side_in == "L" else state.reshape(-1, size).mT    # [size, R]
                outs.append((mat @ inp if side_out == "L" else inp.mT @ mat.mT).reshape(out_sizes))
            states = outs
        delta = torch.empty(tokens, *dims, dtype=out_dtype, device=x.device)
        torch.sub(states[0].permute(final)[0], states[1].permute(final)[0], out=delta)  # one kernel: difference, layout, cast
        ctx.meta = (dims, pad, out_features, x.dtype, x.shape[1], len(gates) - n_gates)
        ctx.save_for_backward(*saved, *stacked)
        return delta.reshape(tokens, -1)[:, :out_features]

    @staticmethod
    def _backward(ctx, grad):
        dims, pad, out_features, x_dtype, d_in, n_gates = ctx.meta
        tensors = ctx.saved_tensors  # once: under checkpointing a second unpack raises
        saved, stacked = tensors[:n_gates], tensors[n_gates:]
        tokens, need_x = grad.shape[0], ctx.needs_input_grad[0]
        program, final, end_sizes = _program(tuple(dims), tokens)
        chains = 2 if need_x else 1                     # S's chain only carries x's gradient
        full = grad.new_zeros(tokens, math.prod(dims)) if out_features < math.prod(dims) else None
        if full is not None:
            full[:, :out_features] = grad
            grad = full
        g_state = torch.empty(chains, *end_sizes, dtype=torch.float32, device=grad.device)
        canonical = g_state.permute(final)
        canonical.copy_(grad.reshape(1, tokens, *dims).expand(chains, *canonical.shape[1:]))
        t_grads = [None] * n_gates
        index = n_gates
        for step in reversed(program):
            if step[0] == "perm":
                g_state = g_state.permute(step[2]).contiguous()
                continue
            _, g, side_in, side_out, size, in_sizes, _, pair, b_axis = step
            index -= 1
            g_out = g_state.reshape(chains, size, -1) if side_out == "L" else g_state.reshape(chains, -1, size).mT
            inp = saved[index] if index else _padded_fp32(saved[0], pad, dims)     # x: cast again, not kept in fp32
            if ctx.needs_input_grad[7 + g]:                                        # [size_out, size_in]
                grad_t = g_out[0] @ (inp.reshape(size, -1).mT if side_in == "L" else inp.reshape(-1, size))
                t_grads[g] = _unoriented(grad_t, pair, b_axis, dims)
            if index == 0 and not need_x:
                break
            mats = stacked[index][:chains]
            if side_in == "L":
                g_in = mats.mT @ g_out
            else:
                g_in = g_out.mT @ mats
            g_state = g_in.reshape(chains, *in_sizes[1:])
        grad_x = None
        if need_x:
            grad_x = torch.empty(tokens, *dims, dtype=x_dtype, device=grad.device)
            torch.sub(g_state[0], g_state[1], out=grad_x)
            grad_x = grad_x.reshape(tokens, -1)[:, :d_in]
        return (grad_x, None, None, None, None, None, None, *t_grads, *([None] * n_gates))


@functools.lru_cache(maxsize=64)
def _program(dims: tuple, tokens: int):
    """:func:`plan` worked out for ``tokens``: every permutation order (forward and back) and every GEMM's shapes,
    so that a call of the node is a loop over tensor ops. Steps: ("perm", order, order_back) or ("gate", g,
    side_in, side_out, size, sizes_in, sizes_out, pair, b_axis). Also the order that permutes the last layout
    to [tokens, axes...], and the last layout's sizes."""
    n = len(dims)
    pairs = [(a % n, b % n) for a, b in axis_pairs(n)]
    start = (TOKENS, *range(n))
    steps, layout = [], start
    for step in plan(n):
        if step[0] == "perm":
            steps.append(("perm", (0, *(1 + layout.index(s) for s in step[1])),
                          (0, *(1 + step[1].index(s) for s in layout))))
            layout = step[1]
            continue
        _, g, layout_in, layout_out, side_in, side_out = step
        pair = layout_in[:2] if side_in == "L" else layout_in[-2:]
        steps.append(("gate", g, side_in, side_out, dims[pair[0]] * dims[pair[1]],
                      (1, *_sizes(layout_in, dims, tokens)), (1, *_sizes(layout_out, dims, tokens)), pair, pairs[g][1]))
        layout = layout_out
    final = (0, *(1 + layout.index(s) for s in start))
    return tuple(steps), final, tuple(_sizes(layout, dims, tokens))


def _padded_fp32(x, pad, dims):
    """x [tokens, d_in] (any float dtype) -> fp32 [1, tokens, *dims], zero-padded to prod(dims)."""
    return (nn.functional.pad(x.float(), (0, pad)) if pad else x.float()).reshape(1, x.shape[0], *dims)


def _unoriented(mat, pair, b_axis, dims):
    """Inverse of :func:`_stacked`'s orientation for a gradient: [out, in] -> [n_b, n_a, n_b, n_a]."""
    first, second = dims[pair[0]], dims[pair[1]]
    grad = mat.reshape(first, second, first, second)
    return grad if pair[0] == b_axis else grad.permute(1, 0, 3, 2)


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

    @property
    def bank_key(self):
        """Layers with equal axes share one per-step build of the fused node's gate matrices (bank.py)."""
        return ("quanta", tuple(self.dims))

    def bank_params(self):
        return tuple(self.T)

    def build_bank(self, deltas):
        """Per layer, the fused node's [2, size, size] (T, S) matrix of each gate, oriented as its plan uses it:
        built for all layers at once a step (one stack, and one copy where the orientation permutes, a gate),
        which took a stack a gate a layer. No graph: the node computes T's gradients itself. ``None`` per
        layer where the per-gate path runs (CPUs by default)."""
        if not fused_default(self.T[0].is_cuda):
            return [None] * len(deltas)
        gates = []
        with torch.no_grad():
            for g, flip in enumerate(_flipped(len(self.dims))):
                both = torch.stack([m.float() for d in deltas for m in (d.T[g], getattr(d, f"S{g}"))])
                both = both.permute(0, 2, 1, 4, 3) if flip else both
                size = both.shape[1] * both.shape[2]
                gates.append(both.reshape(len(deltas), 2, size, size).unbind(0))
        return list(zip(*gates))

    casts_input = True      # takes x in the base dtype: the fp32 cast is fused into the first copy

    def forward(self, x, out_dtype=None):
        return quanta_update(x, list(self.T), self.S, self.dims, math.prod(self.dims) - x.shape[-1],
                             self.out_features, out_dtype, mats=bank_unitary(self))

    def delta_weight(self):
        delta = dense([t.float() for t in self.T], self.dims) - dense([s.float() for s in self.S], self.dims)
        return delta[: self.out_features, : self.in_features]
