"""quanta: Quantum-informed Tensor Adaptation (Chen et al., NeurIPS 2024, arXiv 2406.00132).

The hidden size is factored into axes n_1..n_N (D = prod >= max(d_in, d_out)); x is zero-padded to D,
reshaped to the axes, one gate per unordered pair of axes is applied (pairs in ``itertools.combinations``
order over axes counted from the last), the result is flattened and cropped to d_out. Gate T_ab has
shape [n_b, n_a, n_b, n_a] = [out_b, out_a, in_b, in_a]. A frozen copy S of the initial gates makes the
update Δy = M(T)x - M(S)x exactly zero at the start (W itself is never touched until a merge).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
import string

import torch
from torch import nn

from ....switches import new_or_old
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
    if not fused or not t_gates:           # one axis: no gate, Δy = 0 (the plan needs a gate)
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


def batched_plan() -> bool:
    """Whether the fused node plans batched strided GEMMs (default) or, with ``TK_QUANTA_PLAN=plain``, plain 2-D
    GEMMs with each gate's pair at an end of the layout (more copies: the layouts before 2026-11-23's third
    session), to compare the two on one machine."""
    return new_or_old("TK_QUANTA_PLAN", "batched", "plain")


def plan(n_axes: int, batched: bool = True):
    """The gate chain's layouts, forward and backward, with the fewest full-state copies (cached per number of
    axes). Returns ``(forward, backward)``, two lists of steps:

    - ``("gate", g, layout_in, layout_out, batch, free)``: gate g as one (batched) GEMM. A state's memory
      layout is an order of its axes (the tokens and the circuit axes). The gate's two axes must sit next
      to each other (in either order: the gate matrix is then permuted to match, a small copy the bank makes
      once a step); the other axes fall into two groups that each sit together, the batch and the free axes,
      so that the input is a strided [batch, pair, free] or [batch, free, pair] stack of matrices, and the
      GEMM writes its product into any order of the three groups that keeps the pair or the free group
      innermost (a strided batched GEMM with a strided output: cuBLAS moves the axes for free). The token
      axis must be free or the batch empty, so that every GEMM is tall (2,048+ columns at the bench's size)
      and never thousands of tiny ones.
    - ``("perm", layout_from, layout_to)``: a copy.

    Backward walks the gates in reverse with layouts of its own (``backward`` lists them in the order they
    run). Each gate's weight gradient is one plain 2-D GEMM with the tokens in the long reduction (batched
    weight gradients lose cuBLAS's split-K: 11x slower, measured): so a gate's forward input and the
    gradient of its output have the pair at one end and the other axes in the same order. The forward
    input of the first gate is x's own layout; for its weight gradient backward casts x to fp32 again, into
    the layout :func:`x_layout` says (x's own, or the output gradient's when a copy of the gradient would
    cost more); the last forward layout and the first backward one are free (the difference that crops Δy
    and the copy of Δy's gradient move the axes anyway).
    The search (over the gate orders that keep gates sharing an axis in einsum order; per gate, the pair of
    layouts forward input and output gradient) minimises copies first (``_COPY``; a copy that gathers
    scattered floats costs ``_SCATTERED`` more), then extra kernels a layer, hand-allocated outputs and
    permuted gate matrices. 4 axes: 1 copy forward + 1 backward a layer, where plain 2-D GEMMs (the pair
    at an end of every layout) took 4 + 4; 3 axes: 0 + 1. More than 4 axes: each gate's pair moved last.
    """
    return _plan(n_axes, batched)


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


# plan costs: a full-state copy; more when it gathers scattered floats; one more kernel a layer (a second
# chain's GEMM, a weight gradient permuted into T's layout); an output buffer allocated by hand (host only);
# a gate matrix in the other pair order (the bank builds it once a step for all layers)
_COPY, _SCATTERED, _SMALL, _ALLOC, _FLIP = 1000, 20, 10, 3, 1
_X_PERMUTED = 400   # backward's fp32 copy of x (for the first gate's weight gradient) written in another layout


def _natural(pair):
    """(a, b) -> the pair's order in memory that T_ab [n_b, n_a, n_b, n_a] reshaped to a matrix assumes."""
    return pair[1], pair[0]


def _operand_views(layout, pair):
    """The ways a gate on ``pair`` reads ``layout`` as a strided [batch, pair, free] stack: (batch, free)."""
    i = next((k for k in range(len(layout) - 1) if set(layout[k:k + 2]) == set(pair)), None)
    if i is None:
        return []
    left, right = layout[:i], layout[i + 2:]
    if left and right:
        return [(left, right)]                      # [batch, pair, free]: free innermost
    rest = left or right
    views = [(rest[:k], rest[k:]) for k in range(len(rest))]       # [pair, batch, free] / [batch, free, pair]
    if not right:
        views += [(rest[k:], rest[:k]) for k in range(1, len(rest))]   # [free, batch, pair]
    return views


def _tall(batch, free, batched) -> bool:
    return not batch or (batched and TOKENS in free)


@functools.lru_cache(maxsize=8192)
def _gate_outputs(layout, pair, batched=True):
    """{layout_out: (batch, free, natural)} a gate on ``pair`` can write from ``layout`` without a copy;
    ``natural``: the layout a GEMM returns by itself ([batch, pair, free] or [batch, free, pair] contiguous),
    else the GEMM writes into a buffer allocated for it."""
    out = {}
    for batch, free in _operand_views(layout, pair):
        if not _tall(batch, free, batched):
            continue
        for order in (pair, pair[::-1]):
            groups = {"b": batch, "p": order, "f": free}
            for arrangement in itertools.permutations("bpf"):
                if not groups[arrangement[-1]] or arrangement[-1] == "b":
                    continue
                new = tuple(s for name in arrangement for s in groups[name])
                rank = (bool(batch), not (arrangement[0] == "b" or not batch))
                if new not in out or rank < out[new][1]:                  # prefer unbatched, then natural
                    out[new] = ((batch, free, not rank[1]), rank)
    return {new: value for new, (value, _) in out.items()}


def _pair_in(layout, pair):
    return tuple(s for s in layout if s in pair)


def _flips(pair, *layouts) -> int:
    """1 when a layout holds ``pair`` in the other order than T's: the gate matrix (or its gradient) is then
    permuted, a small copy."""
    return int(any(_pair_in(layout, pair) != _natural(pair) for layout in layouts))


def _ends(layouts, pair):
    """Layouts with ``pair`` at one end."""
    return [layout for layout in layouts if set(layout[:2]) == set(pair) or set(layout[-2:]) == set(pair)]


@functools.lru_cache(maxsize=65536)
def _step_cost(layout, pair, target, backward, batched):
    """Cheapest way for a gate on ``pair`` to take ``layout`` to ``target`` (a copy if it cannot write it):
    (cost, out). Backward runs both chains as one GEMM only without a batch group (else one a chain, into one
    allocated buffer); forward runs the chains apart."""
    best = None
    for out, (batch, free, natural) in _gate_outputs(layout, pair, batched).items():
        if backward and batch:
            cost = _SMALL + _ALLOC
        else:
            cost = 0 if natural else _ALLOC * (1 if backward else 2)
        cost += _FLIP * _flips(pair, layout, out) + (
            0 if out == target else _COPY + _SCATTERED * _scattered(out, target))
        if best is None or cost < best[0]:
            best = (cost, out)
    return best


def _orders(pairs):
    """Every order of the gates that keeps gates sharing an axis in einsum order."""
    preds = [{i for i in range(j) if set(pairs[i]) & set(pairs[j])} for j in range(len(pairs))]
    return [order for order in itertools.permutations(range(len(pairs)))
            if all(preds[g] <= set(order[:k]) for k, g in enumerate(order))]


def _rest(layout, pair):
    return tuple(s for s in layout if s not in pair)


def _grad_layouts(layout, pair):
    """Layouts the gradient of a gate's output may take for a plain weight-gradient GEMM against the gate's
    input in ``layout``: the other axes in the same order, the pair at one end."""
    rest = _rest(layout, pair)
    return [x for p in (pair, pair[::-1]) for x in (rest + p, p + rest)]


def _end_cost(layout, pair, start, batched):
    """The last gate's cheapest output (any layout: the chains' difference moves the axes to ``start``)."""
    outputs = _gate_outputs(layout, pair, batched).items()
    return min((_FLIP * _flips(pair, layout, out) + _SCATTERED * _scattered(out, start) + (0 if natural else _ALLOC),
                out) for out, (_, _, natural) in outputs)


@functools.lru_cache(maxsize=16)
def _plan(n: int, batched: bool):
    pairs = [(a % n, b % n) for a, b in axis_pairs(n)]
    start = (TOKENS, *range(n))
    if n > 4 or not pairs:   # the search grows fast; there, move each gate's two axes to the back (one copy a gate)
        return _greedy_plan(pairs, start)
    layouts = list(itertools.permutations(start))
    best = None
    for order in _orders(pairs):
        # per gate k: (its forward input's layout, its output gradient's layout) -> (cost, path)
        first = pairs[order[0]]
        if not _ends([start], first):
            continue
        # the first gate's weight gradient reads x, which backward casts to fp32 again anyway: that cast may
        # write x in the output gradient's layout (one scattered write of 32 MiB at the bench's size, where
        # bringing the gradient back to x's layout took a 64 MiB copy)
        states = {(start, b): ((_SMALL * _flips(first, start, b)) if _rest(b, first) == _rest(start, first)
                               else _X_PERMUTED + _SMALL * _flips(first, b), ((start, b),))
                  for b in _ends(layouts, first)}
        for k in range(1, len(order)):
            prev, pair = pairs[order[k - 1]], pairs[order[k]]
            new = {}
            for (f, b), (cost, path) in states.items():
                for f2 in _ends(layouts, pair):
                    fwd = _step_cost(f, prev, f2, False, batched)
                    if fwd is None:
                        continue
                    for b2 in _grad_layouts(f2, pair):
                        bwd = _step_cost(b2, pair, b, True, batched)
                        if bwd is None:
                            continue
                        total = cost + fwd[0] + bwd[0] + _SMALL * _flips(pair, f2, b2)   # the weight gradient's
                        if (f2, b2) not in new or total < new[(f2, b2)][0]:
                            new[(f2, b2)] = (total, path + ((f2, b2),))
            states = new
        last = pairs[order[-1]]
        for (f, b), (cost, path) in states.items():
            total = cost + _end_cost(f, last, start, batched)[0] + _SCATTERED * _scattered(start, b)
            if best is None or total < best[0]:
                best = (total, order, path)
    _, order, path = best
    return _steps(order, path, pairs, start, batched)


def x_layout(n_axes: int, batched: bool = True):
    """The layout backward's fp32 copy of x takes for the first gate's weight gradient (see :func:`plan`)."""
    forward, backward = plan(n_axes, batched)
    first, grad = forward[0], backward[-1]
    pair = tuple(s for s in first[2] if s not in first[4] + first[5])
    return first[2] if _rest(grad[2], pair) == _rest(first[2], pair) else grad[2]


def _steps(order, path, pairs, start, batched):
    """The forward and backward step lists of one planned path (see :func:`plan`)."""
    forward, backward = [], []
    for k, g in enumerate(order):
        f = path[k][0]
        out = _step_cost(f, pairs[g], path[k + 1][0], False, batched)[1] if k + 1 < len(order) else \
            _end_cost(f, pairs[g], start, batched)[1]
        forward.append(("gate", g, f, out, *_gate_outputs(f, pairs[g], batched)[out][:2]))
        if k + 1 < len(order) and out != path[k + 1][0]:
            forward.append(("perm", out, path[k + 1][0]))
    for k in range(len(order) - 1, -1, -1):
        g, b = order[k], path[k][1]
        out = (_step_cost(b, pairs[g], path[k - 1][1], True, batched)[1] if k
               else _end_cost(b, pairs[g], start, batched)[1])
        backward.append(("gate", g, b, out, *_gate_outputs(b, pairs[g], batched)[out][:2]))
        if k and out != path[k - 1][1]:
            backward.append(("perm", out, path[k - 1][1]))
    return tuple(forward), tuple(backward)


def _greedy_plan(pairs, start):
    forward, backward, layout = [], [], start
    for g, (a, b) in enumerate(pairs):
        new = tuple(s for s in layout if s not in (a, b)) + (b, a)
        if new != layout:
            forward.append(("perm", layout, new))
        forward.append(("gate", g, new, new, (), new[:-2]))
        layout = new
    for step in reversed(forward):
        backward.append(("perm", step[2], step[1]) if step[0] == "perm" else step)
    return tuple(forward), tuple(backward)


@functools.lru_cache(maxsize=16)
def _orientations(n: int, batched: bool = True):
    """Per gate, how its planned layouts hold its pair, as (out, in) flags (True: the other order than T's
    (b, a)): the forward GEMM's matrix, the backward GEMM's matrix (before its transpose), and the weight
    gradient's [output gradient's pair, input's pair]."""
    pairs = [(a % n, b % n) for a, b in axis_pairs(n)]
    forward, backward = plan(n, batched)

    def flip(g, layout):
        return _pair_in(layout, pairs[g]) != _natural(pairs[g])

    fwd = {s[1]: (flip(s[1], s[3]), flip(s[1], s[2])) for s in forward if s[0] == "gate"}
    bwd = {s[1]: (flip(s[1], s[2]), flip(s[1], s[3])) for s in backward if s[0] == "gate"}
    grad = {g: (bwd[g][0], fwd[g][1]) for g in fwd}
    first = forward[0][1]
    grad[first] = (bwd[first][0], flip(first, x_layout(n, batched)))          # x's fp32 copy may sit in another layout
    return tuple((fwd[g], bwd[g], grad[g]) for g in range(len(pairs)))


def _orient(gates, out_flip: bool, in_flip: bool):
    """Gates [..., n_b, n_a, n_b, n_a] -> matrices [..., out, in] with each side's pair in (b, a) order, or in
    (a, b) order where flipped (a copy then, else a view)."""
    lead, (n_b, n_a) = gates.dim() - 4, gates.shape[-2:]
    order = list(range(gates.dim()))
    if out_flip:
        order[lead], order[lead + 1] = lead + 1, lead
    if in_flip:
        order[lead + 2], order[lead + 3] = lead + 3, lead + 2
    return gates.permute(order).reshape(*gates.shape[:lead], n_b * n_a, n_b * n_a)


def _unorient(grad, shape, out_flip: bool, in_flip: bool):
    """Inverse of :func:`_orient` for a gradient [out, in] -> ``shape`` [n_b, n_a, n_b, n_a]."""
    n_b, n_a = shape[:2]
    out_shape, in_shape = ((n_a, n_b) if out_flip else (n_b, n_a)), ((n_a, n_b) if in_flip else (n_b, n_a))
    order = [1, 0] if out_flip else [0, 1]
    order += [3, 2] if in_flip else [2, 3]
    return grad.view(*out_shape, *in_shape).permute(order).contiguous()   # one copy where flipped (autograd took two)


def _gate_mats(t_gate, s_gate, orientation):
    """A gate's (T, S) matrices [2, out, in] in fp32 as the node's forward and backward GEMMs use them."""
    both = torch.stack([t_gate.float(), s_gate.float()])
    return _orient(both, *orientation[0]), _orient(both, *orientation[1])


def _strides(layout, sizes):
    """Element strides of a contiguous tensor stored in ``layout`` order: {axis: stride}."""
    out, stride = {}, 1
    for axis in reversed(layout):
        out[axis] = stride
        stride *= sizes[axis]
    return out


def _group(axes, strides, sizes):
    """(size, stride) of a group of axes that sit together in memory (size 1 for no axes)."""
    return (math.prod(sizes[a] for a in axes), strides[axes[-1]]) if axes else (1, 0)


class _Gemm:
    """One planned gate for a token count: the strided [batch, pair, free] views of its input and output, and
    the [other axes, pair] view of its input for the weight gradient."""

    def __init__(self, step, sizes):
        _, self.g, layout_in, layout_out, batch, free = step
        pair = tuple(s for s in layout_in if s not in batch + free)
        s_in, s_out = _strides(layout_in, sizes), _strides(layout_out, sizes)
        (nb, bs_in), (np_, ps_in), (nf, fs_in) = (_group(a, s_in, sizes) for a in (batch, pair, free))
        pair_out = tuple(s for s in layout_out if s in pair)         # the matrix's rows, in the output's order
        bs_out, ps_out, fs_out = (_group(a, s_out, sizes)[1] for a in (batch, pair_out, free))
        self.shape, self.stride_in, self.stride_out = (nb, np_, nf), (bs_in, ps_in, fs_in), (bs_out, ps_out, fs_out)
        self.batched, self.numel = bool(batch), math.prod(sizes.values())
        self.sizes_out = tuple(sizes[a] for a in layout_out)
        rest = tuple(s for s in layout_in if s not in pair)       # together in memory: the pair is at one end
        self.rows_shape, self.rows_stride = (self.numel // np_, np_), (s_in[rest[-1]], s_in[pair[-1]])

    def apply(self, mats, state):
        """out[c] = mats[c] @ state[c] on the pair's axes for each chain c: mats [chains, out, in], state
        [chains, layout_in...] contiguous -> [chains, layout_out...]. Where the output layout is the one a GEMM
        returns ([batch, pair, free], or [batch, free, pair] computed as state^T @ mats^T), the GEMM allocates
        it; else it writes into a buffer through a strided view."""
        chains, (nb, np_, nf) = state.shape[0], self.shape
        if not self.batched:                     # [chains, pair, free]: one GEMM (a plain one for one chain)
            src = state.as_strided((chains, np_, nf), (self.numel, *self.stride_in[1:]))
            gemm = torch.mm if chains == 1 else torch.bmm
            if chains == 1:
                mats, src = mats[0], src[0]
            if self.stride_out[1:] == (nf, 1):
                return gemm(mats, src).view(chains, *self.sizes_out)
            if self.stride_out[1:] == (1, np_):
                return gemm(src.mT, mats.mT).view(chains, *self.sizes_out)
            out = torch.empty(chains, *self.sizes_out, dtype=state.dtype, device=state.device)
            dst = out.as_strided((chains, np_, nf), (self.numel, *self.stride_out[1:]))
            gemm(mats, src, out=dst if chains > 1 else dst[0])
            return out
        if chains == 1:                          # [batch, pair, free], one chain
            src, mat = state[0].as_strided(self.shape, self.stride_in), mats[0].expand(nb, -1, -1)
            if self.stride_out == (np_ * nf, nf, 1):
                return torch.bmm(mat, src).view(1, *self.sizes_out)
            if self.stride_out == (np_ * nf, 1, np_):
                return torch.bmm(src.mT, mat.mT).view(1, *self.sizes_out)
        out = torch.empty(chains, *self.sizes_out, dtype=state.dtype, device=state.device)
        for c in range(chains):                  # one batched GEMM a chain, into one buffer for both
            torch.bmm(mats[c].expand(nb, -1, -1), state[c].as_strided(self.shape, self.stride_in),
                      out=out[c].as_strided(self.shape, self.stride_out))
        return out

    def rows(self, state):
        """One chain's state in ``layout_in`` as [other axes, pair] (a strided view, no copy)."""
        return state.as_strided(self.rows_shape, self.rows_stride)


class _XRows:
    """x as the first gate's weight gradient reads it: cast to fp32 (and zero-padded) into :func:`x_layout`."""

    def __init__(self, layout, step, sizes, start):
        pair = tuple(s for s in step[2] if s not in step[4] + step[5])
        strides, rest = _strides(layout, sizes), _rest(layout, pair)
        numel, size = math.prod(sizes.values()), math.prod(sizes[a] for a in pair)
        self.rows_shape, self.rows_stride = (numel // size, size), (strides[rest[-1]], strides[pair[-1]])
        self.sizes, self.order = tuple(sizes[a] for a in layout), tuple(layout.index(a) for a in start)
        self.moved = layout != start

    def __call__(self, x, pad, dims):
        if not self.moved:
            flat = _padded_fp32(x, pad, dims)
        else:
            flat = torch.empty(self.sizes, dtype=torch.float32, device=x.device)
            x = nn.functional.pad(x, (0, pad)) if pad else x
            flat.permute(self.order).copy_(x.reshape(x.shape[0], *dims))   # one kernel: cast and move
        return flat.as_strided(self.rows_shape, self.rows_stride)


@functools.lru_cache(maxsize=64)
def _program(dims: tuple, tokens: int, batched: bool = True):
    """:func:`plan` worked out for ``tokens``: every GEMM's strided views and every copy's permutation order, so
    that a call of the node is a loop over tensor ops. Returns ``(forward, backward, orders, first_sizes,
    x_rows)``:
    steps ("gate", :class:`_Gemm`) or ("perm", order over [chains, layout...]); ``orders`` are the permutations
    to [tokens, axes...] of the last forward layout, the first backward one and the last backward one (no
    chain dimension); ``first_sizes`` the first backward layout's sizes; ``x_rows`` makes the first gate's
    weight-gradient view of x (:class:`_XRows`)."""
    start = (TOKENS, *range(len(dims)))
    sizes = {TOKENS: tokens, **dict(enumerate(dims))}
    forward, backward = plan(len(dims), batched)

    def compile_steps(steps):
        return tuple(("perm", (0, *(1 + step[1].index(s) for s in step[2]))) if step[0] == "perm"
                     else ("gate", _Gemm(step, sizes)) for step in steps)

    def to_start(layout):
        return tuple(layout.index(s) for s in start)

    first_b = backward[0][2]
    orders = (to_start(forward[-1][3]), to_start(first_b), to_start(backward[-1][3]))
    x_rows = _XRows(x_layout(len(dims), batched), forward[0], sizes, start)
    return compile_steps(forward), compile_steps(backward), orders, tuple(sizes[s] for s in first_b), x_rows


class _QuantaChains(torch.autograd.Function):
    """Both circuits, M(T)x and M(S)x, in one autograd node over :func:`plan`'s layouts. Forward keeps the two
    states apart so that only T's gate inputs are kept for backward, and x in its own dtype; backward carries
    both chains' gradients as one stacked state [2, layout...] (a GEMM for both where a gate has no batch
    group, one a chain where it has; one copy for both). T's gate gradients are plain 2-D GEMMs with the
    token axis in the (long) reduction, which keeps cuBLAS's split-K kernels (a batched weight-gradient GEMM
    lost them and ran 11x slower). S has no gradient; when x needs none either, only T's chain runs backward.
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
        batched = batched_plan()
        forward, _, orders, _, _ = _program(tuple(dims), tokens, batched)
        orients = _orientations(len(dims), batched)
        first = _padded_fp32(x, pad, dims)
        states, saved, stacked = [first, first], [None] * n_gates, [None] * n_gates
        for kind, step in forward:
            if kind == "perm":
                states = [state.permute(step).contiguous() for state in states]
                continue
            g = step.g
            mats, stacked[g] = banked[g] if banked is not None else _gate_mats(t_gates[g], s_gates[g], orients[g])
            # T's gate inputs only (its gradients need them); the first is x itself, kept in its own dtype
            saved[g] = x if states[0] is first else states[0]
            states = [step.apply(mats[c:c + 1], state) for c, state in enumerate(states)]   # T and S apart
        delta = torch.empty(tokens, *dims, dtype=out_dtype, device=x.device)
        final = (0, *(1 + k for k in orders[0]))
        torch.sub(states[0].permute(final)[0], states[1].permute(final)[0], out=delta)  # one kernel: difference, layout, cast
        ctx.meta = (dims, pad, out_features, x.dtype, x.shape[1], n_gates, forward[0][1].g,
                    tuple(t.shape for t in t_gates), batched)
        ctx.save_for_backward(*saved, *stacked)
        return delta.reshape(tokens, -1)[:, :out_features]

    @staticmethod
    def _backward(ctx, grad):
        dims, pad, out_features, x_dtype, d_in, n_gates, first_gate, shapes, batched = ctx.meta
        tensors = ctx.saved_tensors  # once: under checkpointing a second unpack raises
        saved, stacked = tensors[:n_gates], tensors[n_gates:]
        tokens, need_x = grad.shape[0], ctx.needs_input_grad[0]
        forward, backward, orders, first_sizes, x_rows = _program(tuple(dims), tokens, batched)
        orients = _orientations(len(dims), batched)
        fwd_of = {step.g: step for kind, step in forward if kind == "gate"}
        chains = 2 if need_x else 1                     # S's chain only carries x's gradient
        full = grad.new_zeros(tokens, math.prod(dims)) if out_features < math.prod(dims) else None
        if full is not None:
            full[:, :out_features] = grad
            grad = full
        g_state = torch.empty(chains, *first_sizes, dtype=torch.float32, device=grad.device)
        canonical = g_state.permute(0, *(1 + k for k in orders[1]))
        canonical.copy_(grad.reshape(1, tokens, *dims).expand(chains, *canonical.shape[1:]))
        t_grads = [None] * n_gates
        for kind, step in backward:
            if kind == "perm":
                g_state = g_state.permute(step).contiguous()
                continue
            g = step.g
            if ctx.needs_input_grad[7 + g]:             # [out, in] = (output gradient rows)^T @ (input rows)
                rows = fwd_of[g].rows(saved[g]) if g != first_gate else x_rows(saved[g], pad, dims)  # x: cast again
                t_grads[g] = _unorient(step.rows(g_state[0]).mT @ rows, shapes[g], *orients[g][2])
            if g == first_gate and not need_x:
                break
            g_state = step.apply(stacked[g][:chains].mT, g_state)
        grad_x = None
        if need_x:
            grad_x = torch.empty(tokens, *dims, dtype=x_dtype, device=grad.device)
            torch.sub(g_state[0].permute(orders[2]), g_state[1].permute(orders[2]), out=grad_x)
            grad_x = grad_x.reshape(tokens, -1)[:, :d_in]
        return (grad_x, None, None, None, None, None, None, *t_grads, *([None] * n_gates))


def _padded_fp32(x, pad, dims):
    """x [tokens, d_in] (any float dtype) -> contiguous fp32 [1, tokens, *dims], zero-padded to prod(dims)."""
    x = nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    return x.contiguous().reshape(1, x.shape[0], *dims)


def dense(gates, dims):
    """M with circuit(x) == M @ x: the circuit applied to the identity, transposed."""
    size = math.prod(dims)
    eye = torch.eye(size, dtype=gates[0].dtype, device=gates[0].device)
    return circuit(eye, gates, dims).T


class QuantaDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, dims=None, generator: torch.Generator | None = None):
        super().__init__()
        dims = list(dims) if dims else default_dims(in_features, out_features)
        if not 2 <= len(dims) <= 7:  # 2: no pair of axes is no gate; 7: the merge's einsum runs out of letters
            raise ValueError(f"quanta needs 2 to 7 axes (one gate per pair of axes), got dims {dims}")
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
        """Per layer, each gate's (forward, backward) [2, out, in] (T, S) matrices, oriented as the fused node's
        plan uses them: built for all layers at once a step (one stack a gate, one copy a flipped orientation),
        which took a stack (and a copy) a gate a layer. No graph: the node computes T's gradients itself.
        ``None`` per layer where the per-gate path runs (CPUs by default)."""
        if not fused_default(self.T[0].is_cuda):
            return [None] * len(deltas)
        gates = []
        with torch.no_grad():
            for g, orientation in enumerate(_orientations(len(self.dims), batched_plan())):
                both = torch.stack([m.float() for d in deltas for m in (d.T[g], getattr(d, f"S{g}"))])
                both = both.unflatten(0, (len(deltas), 2))
                gates.append(list(zip(*(_orient(both, *o).unbind(0) for o in orientation[:2]))))
        return list(zip(*gates))

    casts_input = True      # takes x in the base dtype: the fp32 cast is fused into the first copy

    def forward(self, x, out_dtype=None):
        return quanta_update(x, list(self.T), self.S, self.dims, math.prod(self.dims) - x.shape[-1],
                             self.out_features, out_dtype, mats=bank_unitary(self))

    def delta_weight(self):
        delta = dense([t.float() for t in self.T], self.dims) - dense([s.float() for s in self.S], self.dims)
        return delta[: self.out_features, : self.in_features]
