"""QUANTUM.md tests 1, 2, 5 (circuit half), 6 (fast path) and 7: the circuit math, independent of any model."""
import math
from functools import reduce

import pytest
import torch

from toolkit.model.adapters.quantum import quanta as q
from toolkit.model.adapters.quantum import simulator as sim
from toolkit.model.adapters.quantum.tq import TQDelta, expval_readout, measure, real_form, tq_circuit, tq_unitary
from toolkit.model.adapters.quantum.vqc import (VQCDelta, ring_pairs, vqc_circuit, vqc_real_unitary, vqc_unitary,
                                               vqc_unitary_by_states)

I2 = torch.eye(2, dtype=torch.complex64)
P0 = torch.tensor([[1, 0], [0, 0]], dtype=torch.complex64)
P1 = torch.tensor([[0, 0], [0, 1]], dtype=torch.complex64)


def on_wire(gate, wire, n):
    """The full 2^n matrix of a 1-qubit gate, by Kronecker products (wire 0 leftmost)."""
    return reduce(torch.kron, [gate.to(torch.complex64) if w == wire else I2 for w in range(n)])


def controlled(gate, c, t, n):
    """|0><0|_c ⊗ I + |1><1|_c ⊗ gate_t, by Kronecker products."""
    off = reduce(torch.kron, [P0 if w == c else I2 for w in range(n)])
    on = reduce(torch.kron, [P1 if w == c else gate.to(torch.complex64) if w == t else I2 for w in range(n)])
    return off + on


def kron_vqc(theta, n):
    first, second = ring_pairs(n)
    u = torch.eye(2 ** n, dtype=torch.complex64)
    for layer in theta:
        for ry_angles, ring, pairs in ((layer[0], layer[1], first), (layer[2], layer[3], second)):
            for w in range(n):
                u = on_wire(sim.ry(ry_angles[w]), w, n) @ u
            for angle, (c, t) in zip(ring, pairs):
                u = controlled(sim.rz(angle), c, t, n) @ u
    return u


def test_gate_matrices_and_cnot():
    theta = torch.tensor(0.7)
    c, s = math.cos(.35), math.sin(.35)
    assert torch.allclose(sim.ry(theta), torch.tensor([[c, -s], [s, c]]))
    assert torch.allclose(sim.u3(theta, torch.tensor(0.), torch.tensor(0.)), sim.ry(theta).to(torch.complex64))
    # CNOT(0 -> 1) on |10> gives |11>; wire 0 is the most significant bit
    u = sim.circuit_unitary(lambda s: sim.apply_controlled(s, sim.PAULI_X, 0, 1, 2), 2)
    assert torch.equal(u, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.complex64))
    assert torch.allclose(sim.circuit_unitary(lambda s: sim.apply_controlled(s, sim.PAULI_X, 2, 0, 3), 3),
                          controlled(sim.PAULI_X, 2, 0, 3))


def test_simulator_equals_kronecker_matrices_and_is_unitary():  # QUANTUM.md test 1
    torch.manual_seed(0)
    theta = torch.empty(4, 4, 3).uniform_(-math.pi, math.pi)
    reference = kron_vqc(theta, 3)
    simulated = sim.circuit_unitary(vqc_circuit(theta, 3), 3)
    torch.testing.assert_close(simulated, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(vqc_unitary(theta, 3), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.conj().T @ reference, torch.eye(8, dtype=torch.complex64), atol=1e-5, rtol=0)


def test_tq_unitary_equals_kronecker_matrices():
    torch.manual_seed(1)
    n, theta = 3, torch.empty(2, 2, 3, 3).uniform_(-math.pi, math.pi)
    u = torch.eye(8, dtype=torch.complex64)
    for block in theta:
        for w in range(n):
            u = on_wire(sim.u3(*block[0, w]), w, n) @ u
        for k in range(n):
            u = controlled(sim.u3(*block[1, k]), k, (k + 1) % n, n) @ u
    torch.testing.assert_close(tq_unitary(theta, n), u, atol=1e-5, rtol=0)
    torch.testing.assert_close(sim.circuit_unitary(tq_circuit(theta, n), n), u, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_tq_unitary_gradients_equal_the_gate_by_gate_simulation(n):
    """The batched build (Kronecker U3 layers, 4 x 4 CU3 einsums) = the simulator gate by gate, values and θ
    gradients, for a batch of circuits."""
    theta = torch.empty(3, 2, 2, n, 3).uniform_(-math.pi, math.pi, generator=torch.Generator().manual_seed(n))
    weights = torch.randn(3, 2 ** n, 2 ** n, dtype=torch.complex64, generator=torch.Generator().manual_seed(9))
    results = []
    for build in (lambda t: tq_unitary(t, n),
                  lambda t: torch.stack([sim.circuit_unitary(tq_circuit(one, n), n) for one in t])):
        t = theta.clone().requires_grad_()
        u = build(t)
        (u * weights).real.sum().backward()
        results.append((u.detach(), t.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_quanta_einsum_golden_and_gate_by_gate_equals_dense():  # QUANTUM.md test 2
    assert q.einsum_string(3) == "...abc,efbc,diaf,ghde->...ghi"
    assert q.axis_pairs(3) == [(-1, -2), (-1, -3), (-2, -3)]
    torch.manual_seed(0)
    for dims in ([4, 2, 3, 2], [3, 4, 5]):
        gates = [torch.randn(dims[b], dims[a], dims[b], dims[a]) / 3 for a, b in q.axis_pairs(len(dims))]
        x = torch.randn(5, math.prod(dims))
        by_gate = q.apply_gates(x, gates, dims)
        torch.testing.assert_close(q.circuit(x, gates, dims), by_gate, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x @ q.dense(gates, dims).T, by_gate, atol=1e-5, rtol=1e-5)


def test_quanta_update_equals_the_einsum_difference_with_gradients():
    """The adapter's path (one 2-D matmul per gate, axes left where the last gate put them, padding, crop)."""
    torch.manual_seed(0)
    for dims, d_in, d_out in (([4, 2, 3, 2], 40, 20), ([16, 8, 8, 4], 4096, 4096), ([2, 3, 4, 5, 2], 240, 230)):
        t_gates, s_gates = [[(torch.randn(dims[b], dims[a], dims[b], dims[a]) / 8).requires_grad_()
                             for a, b in q.axis_pairs(len(dims))] for _ in range(2)]
        x = torch.randn(2, 3, d_in, requires_grad=True)
        fast = q.quanta_update(x, t_gates, s_gates, dims, math.prod(dims) - d_in, d_out)
        x_pad = torch.nn.functional.pad(x, (0, math.prod(dims) - d_in))
        slow = (q.circuit(x_pad, t_gates, dims) - q.circuit(x_pad, s_gates, dims))[..., :d_out]
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
        weights = torch.randn_like(fast)
        inputs = [x, *t_gates, *s_gates]
        for f, s in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                        torch.autograd.grad((slow * weights).sum(), inputs)):
            torch.testing.assert_close(f, s, atol=1e-3, rtol=1e-4)


def test_quanta_first_gate_acts_on_last_two_axes():
    dims = [2, 3, 4]
    gates = [torch.zeros(dims[b], dims[a], dims[b], dims[a]) for a, b in q.axis_pairs(3)]
    eye = lambda a, b: torch.eye(dims[a] * dims[b]).reshape(dims[b], dims[a], dims[b], dims[a])  # noqa: E731
    gates[1], gates[2] = eye(-1, -3), eye(-2, -3)
    swap = torch.zeros(3, 4, 3, 4)
    swap[0, 1, 0, 0] = 1                   # (b=0, a=0) -> (b=0, a=1); everything else -> 0
    gates[0] = swap
    x = torch.zeros(24)
    x[0] = 1                               # index (0, 0, 0)
    assert q.circuit(x, gates, dims).nonzero().flatten().tolist() == [1]   # index (0, 0, 1)


def test_quanta_rectangular_crop_and_zero_start():
    torch.manual_seed(0)
    delta = q.QuantaDelta(40, 20, dims=[4, 2, 3, 2])
    x = torch.randn(3, 40)
    assert torch.equal(delta(x), torch.zeros(3, 20))                      # T == S at the start
    with torch.no_grad():
        for t in delta.T:
            t.add_(torch.randn_like(t) * 0.1)
    full = q.dense(list(delta.T), delta.dims) - q.dense(delta.S, delta.dims)
    x_pad = torch.nn.functional.pad(x, (0, 8))
    torch.testing.assert_close(delta(x), (x_pad @ full.T)[:, :20], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.delta_weight(), full[:20, :40])
    torch.testing.assert_close(delta(x), x @ delta.delta_weight().T, atol=1e-5, rtol=1e-5)


def test_vqc_with_identity_circuit_is_lora_and_crz_angles_learn(monkeypatch):  # QUANTUM.md test 5
    torch.manual_seed(0)
    delta = VQCDelta(12, 10, n_qubits=3, n_layers=2, alpha=16)
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(4, 12)
    monkeypatch.setattr(delta, "unitary", lambda: torch.eye(8, dtype=torch.complex64))
    torch.testing.assert_close(delta(x), 16 / 8 * x @ delta.A.T @ delta.B.T)
    monkeypatch.undo()
    delta(x).pow(2).sum().backward()
    crz = delta.theta.grad[:, 1::2]
    assert (crz.abs() > 1e-6).all(), crz
    assert (delta.A.grad.abs() > 0).any() and (delta.B.grad.abs() > 0).any()


def test_tq_fast_path_equals_gate_by_gate_and_is_not_additive():  # QUANTUM.md test 6
    torch.manual_seed(0)
    n = 3
    delta = TQDelta(6, 5, n_qubits=n, n_layers=2)
    phi = torch.pi * torch.tanh(torch.randn(4, 6) @ delta.A.T)
    fast = expval_readout(phi, delta.unitary())
    slow = measure(tq_circuit(delta.theta.detach(), n), phi.detach(), n)
    torch.testing.assert_close(fast.detach(), slow, atol=1e-5, rtol=0)
    with torch.no_grad():
        delta.B.normal_()
    x1, x2 = torch.randn(2, 6), torch.randn(2, 6)
    assert not torch.allclose(delta(x1 + x2), delta(x1) + delta(x2), atol=1e-3)


@pytest.mark.parametrize("d_out", [576, 192])
def test_parameter_counts(d_out):  # QUANTUM.md test 7
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    r = 8
    assert count(VQCDelta(576, d_out, n_qubits=3, n_layers=4)) == r * 576 + d_out * r + 4 * 3 * 4
    assert count(VQCDelta(576, 576, n_qubits=3, n_layers=4)) == 9264
    assert count(VQCDelta(576, d_out, n_qubits=10, n_layers=10, readout="expval")) == 10 * (576 + d_out) + 400
    assert count(TQDelta(576, d_out, n_qubits=8, n_layers=2)) == 8 * (576 + d_out) + 6 * 8 * 2
    assert count(q.QuantaDelta(576, d_out, dims=[8, 8, 9])) == 14464 == 64 ** 2 + 2 * 72 ** 2
    assert count(q.QuantaDelta(4096, 4096, dims=[16, 8, 8, 4])) == 43008
    assert q.default_dims(576, d_out) == [5, 5, 5, 5]


@pytest.mark.parametrize("n", [3, 4])
def test_vqc_unitary_from_basis_states_equals_the_closed_form_and_the_simulation(n):
    torch.manual_seed(n)
    theta = torch.empty(2, 3, 4, n).uniform_(-math.pi, math.pi)          # two circuits, batched
    phi = torch.empty(6, n).uniform_(-math.pi, math.pi)
    by_states = vqc_unitary_by_states(theta, n)
    torch.testing.assert_close(by_states, vqc_unitary(theta, n), atol=1e-5, rtol=0)
    for t, u in zip(theta, by_states):
        reference = measure(vqc_circuit(t, n), phi, n)
        torch.testing.assert_close(expval_readout(phi, u), reference, atol=1e-5, rtol=0)


def test_batched_unitaries_equal_one_by_one():
    torch.manual_seed(2)
    vqc_theta = torch.empty(3, 2, 4, 3).uniform_(-math.pi, math.pi)
    tq_theta = torch.empty(3, 2, 2, 3, 3).uniform_(-math.pi, math.pi)
    for batched, single in ((vqc_unitary(vqc_theta, 3), [vqc_unitary(t, 3) for t in vqc_theta]),
                            (tq_unitary(tq_theta, 3), [tq_unitary(t, 3) for t in tq_theta])):
        torch.testing.assert_close(batched, torch.stack(single), atol=1e-6, rtol=0)


def test_vqc_expval_adjoint_backward_gives_the_gradients_of_the_closed_form():
    torch.manual_seed(3)
    delta = VQCDelta(12, 10, n_qubits=4, n_layers=2, readout="expval")
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(5, 12, requires_grad=True)
    delta(x).pow(2).sum().backward()
    checkpointed = [x.grad.clone()] + [p.grad.clone() for p in delta.parameters()]
    x.grad = None
    delta.zero_grad()
    phi = torch.pi * torch.tanh(x @ delta.A.T)
    (expval_readout(phi, vqc_unitary(delta.theta, 4)) @ (delta.scale * delta.B).T).pow(2).sum().backward()
    for a, b in zip(checkpointed, [x.grad] + [p.grad for p in delta.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def random_gates(dims, dtype=torch.float32):
    return [(torch.randn(dims[b], dims[a], dims[b], dims[a]) / 8).to(dtype).requires_grad_()
            for a, b in q.axis_pairs(len(dims))]


@pytest.mark.parametrize("dims, d_in, d_out", [([16, 8, 8, 4], 4096, 4096), ([4, 2, 3, 2], 40, 20), ([3, 4, 5], 50, 60),
                                               ([2, 3, 4, 5, 2], 240, 230), ([3, 5], 15, 15)])
@pytest.mark.parametrize("x_needs_grad", [True, False])
@pytest.mark.parametrize("layouts", ["batched", "plain"])
def test_quanta_fused_chains_equal_the_reference_with_gradients(monkeypatch, dims, d_in, d_out, x_needs_grad, layouts):
    """The CUDA path (one autograd node for both circuits, planned layouts: batched strided GEMMs, or plain ones
    with TK_QUANTA_PLAN=plain) = the per-gate autograd reference, values and gradients, with padding,
    cropping, and x with or without a gradient (S only carries x's)."""
    monkeypatch.setenv("TK_QUANTA_PLAN", layouts)
    torch.manual_seed(0)
    t_gates, s_gates = random_gates(dims), [g.detach() for g in random_gates(dims)]
    x = torch.randn(2, 3, d_in, requires_grad=x_needs_grad)
    pad = math.prod(dims) - d_in
    fast = q.quanta_update(x, t_gates, s_gates, dims, pad, d_out, fused=True)
    slow = q.reference_update(x, t_gates, s_gates, dims, pad, d_out)
    assert fast.shape == slow.shape == (2, 3, d_out)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fast)
    inputs = [x, *t_gates] if x_needs_grad else t_gates
    for f, s in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                    torch.autograd.grad((slow * weights).sum(), inputs)):
        torch.testing.assert_close(f, s, atol=1e-4, rtol=1e-4)


def test_quanta_fused_chains_take_bf16_input_and_weights_and_compute_in_fp32():
    """x and the gates in bf16 (a bf16 base, DeepSpeed's bf16 weights): fp32 inside, Δy cast once on the way
    out, gradients in the inputs' dtypes."""
    torch.manual_seed(1)
    dims = [4, 2, 3, 2]
    t_gates, s_gates = random_gates(dims, torch.bfloat16), [g.detach() for g in random_gates(dims, torch.bfloat16)]
    x = torch.randn(5, 48).bfloat16().requires_grad_()
    fast = q.quanta_update(x, t_gates, s_gates, dims, 0, 48, torch.bfloat16, fused=True)
    in_fp32 = q.quanta_update(x, t_gates, s_gates, dims, 0, 48, fused=True)
    exact = q.reference_update(x.float(), [t.float() for t in t_gates], [s.float() for s in s_gates], dims, 0, 48)
    assert fast.dtype == torch.bfloat16 and in_fp32.dtype == torch.float32
    assert torch.equal(fast, in_fp32.to(torch.bfloat16))
    torch.testing.assert_close(in_fp32, exact, atol=1e-5, rtol=1e-5)
    fast.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in t_gates)


@pytest.mark.parametrize("n_axes, copies, batched", [(2, (0, 0), True), (3, (0, 0), True), (4, (1, 1), True),
                                                      (5, (9, 9), True), (3, (2, 2), False), (4, (4, 4), False)])
def test_quanta_plan_applies_every_gate_once_in_a_valid_order(n_axes, copies, batched):
    """The layout plan: each gate once forward and once backward (in reverse), gates sharing an axis in einsum
    order, each gate's pair next to each other in its input, every GEMM tall (no batch, or the tokens among
    the free axes), each weight gradient a plain GEMM (input and output gradient with the pair at one end and
    the other axes in the same order; for the first gate x's fp32 copy in backward, in :func:`quanta.x_layout`),
    and the fewest copies: 4 axes 1 forward + 1 backward, where the plan with plain 2-D GEMMs only took 4 + 4;
    3 axes none. The plain plan (TK_QUANTA_PLAN=plain, no batch groups) keeps the copies of before."""
    forward, backward = q.plan(n_axes, batched)
    pairs = [(a % n_axes, b % n_axes) for a, b in q.axis_pairs(n_axes)]
    order = [step[1] for step in forward if step[0] == "gate"]
    assert sorted(order) == list(range(len(pairs)))
    assert [step[1] for step in backward if step[0] == "gate"] == order[::-1]
    for i, g in enumerate(order):
        assert all(not set(pairs[g]) & set(pairs[h]) for h in order[i + 1:] if h < g)

    def walk(steps, layout):
        layouts = {}
        for step in steps:
            if step[0] == "perm":
                assert step[1] == layout and sorted(step[2]) == sorted(layout) and step[2] != layout
                layout = step[2]
                continue
            _, g, layout_in, layout_out, batch, free = step
            assert layout_in == layout if layout is not None else True
            pair = tuple(s for s in layout_in if s not in batch + free)
            assert set(pair) == set(pairs[g]) and sorted(layout_out) == sorted(layout_in)
            assert any(layout_in[k:k + 2] == pair for k in range(n_axes))        # the pair sits together
            assert not batch or (batched and q.TOKENS in free)                      # tall GEMMs only
            layouts[g] = layout_in
            layout = layout_out
        return layouts

    inputs = walk(forward, (q.TOKENS, *range(n_axes)))
    grads = walk(backward, None)
    inputs[order[0]] = q.x_layout(n_axes, batched)
    for g, pair in enumerate(pairs):
        for layout in (inputs[g], grads[g]):
            assert set(layout[:2]) == set(pair) or set(layout[-2:]) == set(pair)
        assert [s for s in inputs[g] if s not in pair] == [s for s in grads[g] if s not in pair]
    assert (sum(step[0] == "perm" for step in forward), sum(step[0] == "perm" for step in backward)) == copies


@pytest.mark.parametrize("dims", [(16, 8, 8, 4), (4, 2, 3, 2), (3, 4, 5), (2, 3, 4, 5, 2)])
def test_quanta_gemm_views_are_ones_cublas_takes_without_a_copy(dims):
    """Every GEMM of the fused node reads and writes strided [batch, rows, columns] views: each must have one
    unit stride and a large enough leading dimension (what torch's CUDA bmm/mm pass to cuBLAS as they are;
    otherwise torch copies the operand or the result, the copies the plan is there to avoid)."""
    forward, backward, _, _, x_rows = q._program(tuple(dims), 7)

    def takes(shape, stride):
        _, rows, cols = shape
        return (stride[2] == 1 and stride[1] >= max(1, cols)) or (stride[1] == 1 and stride[2] >= max(1, rows))

    for kind, step in forward + backward:
        if kind == "gate":
            assert takes(step.shape, step.stride_in) and takes(step.shape, step.stride_out), step.__dict__
            rows, cols = step.rows_shape
            assert step.rows_stride in ((cols, 1), (1, rows))                       # the weight gradient's view
    rows, cols = x_rows.rows_shape
    assert x_rows.rows_stride in ((cols, 1), (1, rows))


@pytest.mark.parametrize("n, layers, circuits", [(2, 1, 2), (3, 2, 3), (4, 3, 1), (5, 2, 2), (7, 2, 2)])
def test_vqc_real_unitary_equals_the_reference_with_gradients(n, layers, circuits):
    """The expectation readout's build (real-view GEMMs, phases folded into complex GEMMs, a backward that
    walks the circuit in reverse) = [Re U; Im U] of the einsum build, values and θ gradients."""
    torch.manual_seed(n)
    theta = torch.empty(circuits, layers, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    fast = vqc_real_unitary(theta, n)
    slow = real_form(vqc_unitary_by_states(theta, n))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, real_form(vqc_unitary(theta, n)), atol=1e-5, rtol=0)
    weights = torch.randn_like(fast)
    (fast_grad,), (slow_grad,) = (torch.autograd.grad((out * weights).sum(), theta) for out in (fast, slow))
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-4, rtol=1e-4)
    single = vqc_real_unitary(theta[1 % circuits].detach(), n)          # no leading dims
    torch.testing.assert_close(single, fast[1 % circuits].detach(), atol=1e-6, rtol=0)


def test_vqc_real_unitary_splits_kb_gradients_over_many_chunks(monkeypatch):
    """Kb's gradient summed over hand-made split-K chunks (forced small here) = the einsum build's θ gradient."""
    from toolkit.model.adapters.quantum import vqc
    monkeypatch.delenv("TK_QUANTUM_KB_CHUNK", raising=False)
    monkeypatch.setattr(vqc, "KB_CHUNK", 4)
    torch.manual_seed(0)
    n = 5
    theta = torch.empty(3, 2, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    fast, slow = vqc_real_unitary(theta, n), real_form(vqc_unitary_by_states(theta, n))
    weights = torch.randn_like(fast)
    (fast_grad,), (slow_grad,) = (torch.autograd.grad((out * weights).sum(), theta) for out in (fast, slow))
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-4, rtol=1e-4)


def test_vqc_real_unitary_has_no_small_batched_gemm_with_a_long_reduction(monkeypatch):
    """No batched GEMM of the build (forward and backward) makes small outputs (<= 64 x 64 a batch) from a
    reduction longer than KB_CHUNK: cuBLAS has no split-K for batched GEMMs, and Kb's gradient as one GEMM a
    circuit (reducing 65,536 numbers at n = 10) took 2.0 ms a sublayer on an H100 (64 tiles of 32 x 32)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from toolkit.model.adapters.quantum.vqc import KB_CHUNK
    monkeypatch.delenv("TK_QUANTUM_KB_CHUNK", raising=False)  # the shipped chunk, whatever the shell sets
    assert KB_CHUNK == 1024
    shapes = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("bmm", "baddbmm"):
                a, b = args[-2], args[-1]
                shapes.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2]))      # batch, M, K, N
            return func(*args, **(kwargs or {}))

    n = 8
    theta = torch.empty(2, 2, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    with Shapes():
        out = vqc_real_unitary(theta, n)
        out.backward(torch.randn_like(out))
    assert shapes
    long_small = [s for s in shapes if s[1] * s[3] <= 64 * 64 and s[2] > KB_CHUNK]
    assert not long_small, long_small


def _kb_gemms(n, circuits):
    """(phase, Kb operand strides, state view shape and strides, output strides) of each Kb GEMM of the build
    (an fp32 bmm into a given output whose first operand is [C, B, B]), forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    bb, phase, calls = 2 ** (n - n // 2), ["forward"], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ == "bmm" and "out" in kwargs and args[0].dtype == torch.float32 \
                    and tuple(args[0].shape) == (circuits, bb, bb):
                kb, x = args
                calls.append((phase[0], kb.stride(), (tuple(x.shape), x.stride()), kwargs["out"].stride()))
            return func(*args, **kwargs)

    theta = torch.empty(circuits, 3, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    with Record():
        out = vqc_real_unitary(theta, n)
        phase[0] = "backward"
        out.backward(torch.randn_like(out))
    return calls


@pytest.mark.parametrize("n", [5, 6])
def test_vqc_real_unitary_forward_kb_gemms_are_the_backward_ones(monkeypatch, n):
    """Every Kb GEMM of the build, forward and backward, hands cuBLAS one problem: the same shapes, strides and
    transposes (Kb a transposed view, 't'). On the H100 backward's ran a faster kernel than the forward's 'n'
    ones (396 against 474 µs a call at the bench's sizes). Control: TK_QUANTUM_KB_FORWARD=plain (the layout
    of before) makes two problems."""
    monkeypatch.delenv("TK_QUANTUM_KB_FORWARD", raising=False)
    bb = 2 ** (n - n // 2)
    calls = _kb_gemms(n, circuits=3)
    assert [phase for phase, *_ in calls] == ["forward"] * 5 + ["backward"] * 10           # 6 sublayers
    assert {tuple(problem) for _, *problem in calls} == {((bb * bb, 1, bb),) + tuple(calls[0][2:])}
    monkeypatch.setenv("TK_QUANTUM_KB_FORWARD", "plain")
    plain = _kb_gemms(n, circuits=3)
    assert {phase: kb for phase, kb, *_ in plain} == {"forward": (bb * bb, bb, 1), "backward": (bb * bb, 1, bb)}


@pytest.mark.parametrize("layout", ["transposed", "plain"])
@pytest.mark.parametrize("n, layers, circuits", [(2, 2, 2), (5, 2, 3), (8, 2, 2), (10, 2, 2)])
def test_vqc_real_unitary_forward_kb_layouts_equal_the_reference(monkeypatch, layout, n, layers, circuits):
    """Both layouts of the forward's Kb operand (TK_QUANTUM_KB_FORWARD) build the einsum build's [Re U; Im U] and
    θ gradients, up to the bench's n = 10 (A = B = 32, 1,024 columns; fewer circuits and layers)."""
    monkeypatch.setenv("TK_QUANTUM_KB_FORWARD", layout)
    torch.manual_seed(n)
    theta = torch.empty(circuits, layers, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    fast, slow = vqc_real_unitary(theta, n), real_form(vqc_unitary_by_states(theta, n))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    weights = torch.randn_like(fast)
    (fast_grad,), (slow_grad,) = (torch.autograd.grad((out * weights).sum(), theta) for out in (fast, slow))
    torch.testing.assert_close(fast_grad, slow_grad, atol=2e-5 * slow_grad.abs().max().item(), rtol=1e-4)


def test_vqc_real_unitary_with_a_wrong_kb_layout_differs_from_the_reference(monkeypatch):
    """Control for the test above: the forward's Kb operand laid out without its transposing view (Kb^T's values
    where Kb's belong) no longer builds the reference's unitary."""
    from toolkit.model.adapters.quantum import vqc
    monkeypatch.setattr(vqc, "_kb_forward_operands", lambda kb: kb.mT.contiguous())
    torch.manual_seed(0)
    theta = torch.empty(2, 2, 4, 5).uniform_(-math.pi, math.pi)
    wrong, slow = vqc_real_unitary(theta, 5), real_form(vqc_unitary_by_states(theta, 5))
    assert (wrong - slow).abs().max() > 0.05


def test_count_vqc_build_maps_the_bench_build(monkeypatch):
    """tools/count_vqc_build.py at the 7B bench's build (64 circuits, n = 10, L = 10; meta device): the six
    per-sublayer GEMMs of docs/quantum.md's map, 19 or 38 calls each, each streaming the 512 MiB state once or
    twice (~1 GiB a call), and the forward's Kb GEMM the backward's problem."""
    import importlib.util
    from pathlib import Path
    monkeypatch.delenv("TK_QUANTUM_KB_FORWARD", raising=False)
    monkeypatch.delenv("TK_QUANTUM_KB_CHUNK", raising=False)
    path = Path(__file__).resolve().parents[2] / "tools" / "count_vqc_build.py"
    spec = importlib.util.spec_from_file_location("count_vqc_build", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = tool.count(10, 10, 64)
    gemms = [row for row in rows if row[2] == "gemm"]
    assert sum(row[0] for row in gemms) == 158
    streaming = sorted((phase, dtype, calls, round(nbytes / 2 ** 20)) for calls, phase, _, dtype, _, nbytes in gemms
                       if nbytes >= 2 ** 30)
    assert streaming == [("backward", "complex64", 19, 1040), ("backward", "complex64", 38, 1040),
                         ("backward", "float32", 19, 1040), ("backward", "float32", 38, 1024),
                         ("forward", "complex64", 19, 1040), ("forward", "float32", 19, 1024)]
    kb = {phase: what for calls, phase, _, dtype, what, nbytes in gemms if dtype == "float32" and nbytes == 1074003968}
    assert kb["forward"] == kb["backward"] and "(64, 32, 32)(1024, 1, 32) @" in kb["forward"]


def test_vqc_real_unitary_keeps_no_intermediate_states_for_backward():
    """What the expval build saves for backward: its inputs and its output, not its 2L intermediate states
    (those made the 7B bench's peak 44.7 GiB against LoRA's 22.5)."""
    n, layers = 6, 4
    theta = torch.empty(3, layers, 4, n).uniform_(-math.pi, math.pi).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        out = vqc_real_unitary(theta, n)
    state = out.numel() * out.element_size()                               # [Re U; Im U] of all circuits
    assert sum(saved) < 3 * state, (sum(saved), state)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        real_form(vqc_unitary_by_states(theta, n))
    assert sum(saved) > 2 * layers * state / 2                              # the reference keeps every layer


def test_tf32_for_circuit_gemms_is_opt_in_and_scoped(monkeypatch):
    """TK_QUANTUM_TF32=1 turns TF32 on for the circuit GEMMs only, and the user's setting comes back after."""
    from toolkit.model.adapters.quantum.fused import circuit_matmul_precision
    user_setting = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.delenv("TK_QUANTUM_TF32", raising=False)
        with circuit_matmul_precision():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        monkeypatch.setenv("TK_QUANTUM_TF32", "1")
        with circuit_matmul_precision():
            assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = user_setting


def test_quanta_fused_chains_keep_no_more_for_backward_than_the_reference():
    """The fused node keeps T's gate inputs only (not S's) and x in its own dtype (bf16: half the bytes of
    its fp32 copy): what it saves for backward is below the per-gate autograd path's."""
    torch.manual_seed(0)
    dims = [16, 8, 8, 4]
    t_gates, s_gates = random_gates(dims), [g.detach() for g in random_gates(dims)]
    x = torch.randn(64, 4096).bfloat16().requires_grad_()

    def saved_bytes(fused):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            q.quanta_update(x, t_gates, s_gates, dims, 0, 4096, torch.bfloat16, fused=fused)
        return sum(sizes)

    state = 64 * 4096 * 4                                  # one fp32 state
    fused, reference = saved_bytes(True), saved_bytes(False)
    assert fused <= reference - state // 2, (fused, reference)
    assert fused < 6 * state                               # 5 of T's states + x in bf16 + the small gates


@pytest.mark.parametrize("n", range(2, 12))
def test_tree_encoding_equals_the_wire_by_wire_one(n):
    """ψ_enc built by pairing neighbouring factors (odd counts leave tails) = the wire-by-wire outer products."""
    from toolkit.model.adapters.quantum.readout import encode_tree
    from toolkit.model.adapters.quantum.tq import encode
    phi = torch.rand(7, n, generator=torch.Generator().manual_seed(n)) * 6 - 3
    torch.testing.assert_close(encode_tree(torch.stack([torch.cos(phi / 2), torch.sin(phi / 2)], -1))[0], encode(phi), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind, n", [("tq", 2), ("tq", 3), ("tq", 5), ("tq", 8), ("vqc", 5), ("vqc", 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expval_readout_node_equals_autograd_and_keeps_less(kind, n, dtype):
    """The expectation readout the adapters run (readout.py: one node, written-out backward) = tq's autograd
    readout, values and gradients (x, A, B, θ through U), within 1e-5 of each tensor's largest entry (a bf16
    x's gradient: one bf16 rounding step); it keeps x in its own dtype (no fp32 copy) and, besides ψ_enc and the
    amplitudes, at most 2^(n-1) + 8n + 2^(n/2+2) floats a token."""
    from toolkit.model.adapters.quantum.tq import expval_delta, expval_update
    torch.manual_seed(n)
    delta = (TQDelta(24, 20, n_qubits=n, n_layers=2) if kind == "tq"
             else VQCDelta(24, 20, n_qubits=n, n_layers=2, readout="expval"))
    with torch.no_grad():
        delta.B.normal_()
    x = torch.randn(2, 64, 24).to(dtype).requires_grad_()
    weights = torch.randn(2, 64, 20)
    real_of = (lambda: real_form(delta.unitary())) if kind == "tq" else delta.unitary
    node = lambda x, real: expval_delta(x, delta.A.float(), real, delta.B.float(), delta.scale, n)  # noqa: E731
    reference = lambda x, real: expval_update(x.float(), delta.A.float(), real,  # noqa: E731
                                              delta.scale * delta.B.float(), sim.z_signs(n))
    results, kept = [], []
    for readout in (node, reference):
        real = real_of()                               # U's build is the bank's, not the readout's
        inputs = {t.data_ptr() for t in (x, real, *delta.parameters())}
        sizes = []                                     # what the readout keeps besides its inputs, per token
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append((0, None) if t.data_ptr() in inputs else (t.numel() // 128, t.shape)) or t,
                lambda t: t):
            out = readout(x, real)
        kept.append(sizes)
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in delta.parameters()])
        x.grad = None
        delta.zero_grad(set_to_none=True)
    for got, want in zip(*results):                    # a bf16 x's gradient: also one bf16 rounding step apart
        ulp = 2 ** -7 * want.float().abs() if want.dtype == torch.bfloat16 else 0
        assert ((got.float() - want.float()).abs() <= 1e-5 * want.float().abs().max() + ulp).all()
    widths = [w for w, shape in kept[0]]
    assert sum(widths) <= 3 * 2 ** n + 2 ** (n - 1) + 8 * n + 2 ** (n / 2 + 2), kept[0]
    assert (128, 24) not in [shape for _, shape in kept[0]]           # no fp32 copy of x
    if dtype == torch.bfloat16:
        assert (128, 24) in [shape for _, shape in kept[1]]           # autograd kept one


@pytest.mark.parametrize("name,value", [("TK_QUANTUM_KB_CHUNK", "abc"), ("TK_QUANTUM_KB_CHUNK", "0"),
                                        ("TK_QUANTA_PLAN", "Plain"), ("TK_QUANTUM_KB_FORWARD", "nt")])
def test_a_bad_speed_setting_in_the_environment_is_one_line(monkeypatch, name, value):
    from toolkit.errors import UserError
    from toolkit.model.adapters.quantum import quanta, vqc
    monkeypatch.setenv(name, value)
    read = {"TK_QUANTUM_KB_CHUNK": vqc.kb_chunk, "TK_QUANTA_PLAN": quanta.batched_plan,
            "TK_QUANTUM_KB_FORWARD": vqc.kb_forward_transposed}[name]
    with pytest.raises(UserError, match=f"{name}={value!r} must be") as error:
        read()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("dims", [[4096], [2] * 8])
def test_quanta_refuses_fewer_than_2_or_more_than_7_axes(dims):
    from toolkit.model.adapters.quantum.quanta import QuantaDelta
    with pytest.raises(ValueError, match=r"quanta needs 2 to 7 axes"):
        QuantaDelta(256, 256, dims)
