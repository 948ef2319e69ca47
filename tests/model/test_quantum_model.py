"""QUANTUM.md tests 3, 4, 6 (merge refusal) and the save -> load round trip, on a tiny random llama
(hidden 64, GQA v_proj 64 -> 32) and through the CLI chain train -> pth_to_hf -> merge / load."""
import io
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from toolkit.cli.main import main
from toolkit.errors import UserError
from toolkit.model.adapters import apply_adapter
from toolkit.model.adapters.quantum import (CONFIG_FILE, WEIGHTS_FILE, adapted_layers, load_adapter,
                                            merge_and_unload, save_adapter)
from toolkit.model.merge import load_adapted

PROBE = torch.tensor([[1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 36, 37, 38]])
ADAPTERS = {
    "vqc": dict(type="vqc", n_qubits=3, n_layers=2, alpha=16),
    "vqc_expval": dict(type="vqc", n_qubits=4, n_layers=2, readout="expval"),
    "tq": dict(type="tq", n_qubits=4, n_layers=2, alpha=8),
    "quanta": dict(type="quanta", dims=[4, 4, 4]),
}


def base(folder, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def adapted(folder, name, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    return apply_adapter(base(folder, dtype), dict(ADAPTERS[name], target_modules=["q_proj", "v_proj"], **extra))


def perturb(model, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)


def logits(model):
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapted_output_equals_base_at_init(tiny_llama_dir, name):  # QUANTUM.md test 3
    reference = logits(base(tiny_llama_dir))
    model = adapted(tiny_llama_dir, name)
    assert len(adapted_layers(model)) == 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".delta." in n for n in trainable)
    assert torch.equal(logits(model), reference)


@pytest.mark.parametrize("name", ["vqc", "tq", "quanta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_and_autocast(tiny_llama_dir, name, dtype):
    model = adapted(tiny_llama_dir, name, dtype=dtype)
    perturb(model)
    layer = next(iter(adapted_layers(model).values()))
    assert layer.delta.A.dtype == torch.float32 if name != "quanta" else layer.delta.T[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(PROBE, labels=PROBE)
    out.loss.backward()
    assert out.logits.isfinite().all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads) and any(g.abs().sum() > 0 for g in grads)
    x = torch.randn(2, 64, dtype=dtype)
    assert layer(x).dtype == dtype


@pytest.mark.parametrize("name", ["vqc", "quanta"])
def test_merge_is_exact_and_unmerge_restores(tiny_llama_dir, name):  # QUANTUM.md test 4
    model = adapted(tiny_llama_dir, name)
    perturb(model)
    unmerged = logits(model)
    before = {n: m.weight.detach().clone() for n, m in adapted_layers(model).items()}
    for layer in adapted_layers(model).values():
        layer.merge()
    assert not torch.equal(next(iter(adapted_layers(model).values())).weight, next(iter(before.values())))
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=0)
    for name_, layer in adapted_layers(model).items():
        layer.unmerge()
        torch.testing.assert_close(layer.weight, before[name_], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert not adapted_layers(plain) and type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tq", "vqc_expval"])
def test_nonlinear_adapters_refuse_to_merge_and_chat_unmerged(tiny_llama_dir, tmp_path, name, capsys, monkeypatch):
    """QUANTUM.md test 6 (merge raises), and the adapter stays usable unmerged."""
    model = adapted(tiny_llama_dir, name)
    with pytest.raises(UserError, match="cannot be merged"):
        merge_and_unload(model)
    assert adapted_layers(model)                     # still adapted, still usable
    save_adapter(model, tmp_path)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["convert", "merge", tiny_llama_dir, str(tmp_path), str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be merged" in err and "--adapter" in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\nEXIT\n"))         # still usable unmerged
    assert main(["chat", tiny_llama_dir, "--adapter", str(tmp_path), "--prompt-template", "chatml",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_save_load_round_trip_gives_identical_logits(tiny_llama_dir, tmp_path, name):
    model = adapted(tiny_llama_dir, name, dropout=0.1)
    perturb(model)
    expected = logits(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["type"] == ADAPTERS[name]["type"] and config["dropout"] == 0.1
    loaded = load_adapter(base(tiny_llama_dir), tmp_path).eval()
    assert torch.equal(logits(loaded), expected)
    again = load_adapted(tiny_llama_dir, tmp_path, dtype="float32").eval()
    assert torch.equal(logits(again), expected)


def test_quanta_frozen_copy_is_reproducible_and_saved(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file
    one, two = adapted(tiny_llama_dir, "quanta"), adapted(tiny_llama_dir, "quanta")
    torch.manual_seed(123)
    three = adapted(tiny_llama_dir, "quanta", seed=0)
    layers = [list(adapted_layers(m).values()) for m in (one, two, three)]
    for a, b, c in zip(*layers):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a.delta.S, b.delta.S, c.delta.S))
    assert not torch.equal(layers[0][0].delta.S[0], layers[0][1].delta.S[0])   # differs across layers
    save_adapter(one, tmp_path)
    keys = load_file(str(tmp_path / WEIGHTS_FILE))
    assert "model.layers.0.self_attn.q_proj.S0" in keys and "model.layers.0.self_attn.q_proj.T.0" in keys


def test_bad_settings_are_one_line_errors(tiny_llama_dir):
    with pytest.raises(UserError, match="no setting 'rank'"):
        adapted(tiny_llama_dir, "vqc", rank=4)
    with pytest.raises(UserError, match="match no linear layer"):
        apply_adapter(base(tiny_llama_dir), dict(type="tq", target_modules=["nope"]))
    with pytest.raises(UserError, match="dims"):
        apply_adapter(base(tiny_llama_dir), dict(type="quanta", dims=[2, 2], target_modules=["q_proj"]))
    with pytest.raises(UserError, match=r"quanta on .*q_proj: quanta needs 2 to 7 axes .* got dims \[64\]"):
        apply_adapter(base(tiny_llama_dir), dict(type="quanta", dims=[64], target_modules=["q_proj"]))
    with pytest.raises(UserError, match="readout"):
        adapted(tiny_llama_dir, "vqc", readout="probs")


def test_train_convert_load_merge_and_chat_chain(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    """quanta through the CLI: trained weights move, the adapter folder reproduces the checkpoint's model."""
    from mmengine.config import Config

    from toolkit.checkpoint import load_model_state
    assert main(["copy-cfg", "smollm2_135m_instruct_quanta_champ_e3", str(tmp_path)]) == 0
    cfg_path = tmp_path / "smollm2_135m_instruct_quanta_champ_e3_copy.py"
    text = cfg_path.read_text()
    for key, value in dict(pretrained_model_name_or_path=tiny_llama_dir, max_length=128, drop_long_samples=False,
                           lr=1e-2, save_steps=4).items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", text, count=1, flags=re.M)
        assert n == 1
    cfg_path.write_text(text.replace("dims=[2, 5, 6, 10]", "dims=[4, 4, 4]"))
    work = tmp_path / "work"
    assert main(["train", str(cfg_path), "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=4",
                 "default_hooks.logger.interval=1"]) == 0
    adapter = tmp_path / "adapter"
    assert main(["convert", "pth_to_hf", str(cfg_path), str(work / "iter_4.pth"), str(adapter)]) == 0
    assert {CONFIG_FILE, WEIGHTS_FILE, "tk_meta.json", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    assert not (adapter / "adapter_config.json").exists()

    cfg = Config.fromfile(str(cfg_path))
    model_cfg = dict(cfg.model)
    trained = model_cfg.pop("type")(**model_cfg)
    trained.load_state_dict(load_model_state(work / "iter_4.pth"), strict=False)
    trained = trained.llm.eval()
    assert any((t - s).abs().max() > 0 for layer in adapted_layers(trained).values()
               for t, s in zip(layer.delta.T, layer.delta.S)), "training did not move T"
    expected = logits(trained)
    assert not torch.equal(expected, logits(base(tiny_llama_dir)))
    assert torch.equal(logits(load_adapted(tiny_llama_dir, adapter, dtype="float32").eval()), expected)

    merged = tmp_path / "merged"
    assert main(["convert", "merge", tiny_llama_dir, str(adapter), str(merged), "--device", "cpu"]) == 0
    torch.testing.assert_close(logits(base(str(merged))), expected, atol=1e-5, rtol=0)

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2+2?\nEXIT\n"))
    capsys.readouterr()
    assert main(["chat", tiny_llama_dir, "--adapter", str(adapter), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("name", ["vqc", "tq"])
def test_shared_unitary_bank_gives_the_same_gradients_with_checkpointing_and_accumulation(tiny_llama_dir, name):
    """All layers' unitaries are built in one batched call per model forward (bank.py); the gradients equal
    those of per-layer builds, also with gradient checkpointing and two backward passes before a step."""
    from toolkit.model.adapters.quantum.inject import unload
    model = adapted(tiny_llama_dir, name)
    perturb(model)
    deltas = [layer.delta for layer in adapted_layers(model).values()]
    [bank] = model._tk_banks

    def grads(model):
        for _ in range(2):                            # accumulation: two forwards, two backwards
            model(PROBE, labels=PROBE).loss.backward()
        out = [p.grad.clone() for d in deltas for p in d.parameters()]
        model.zero_grad()
        return out

    banked = grads(model)
    assert bank.current is not None and len(bank.current) == 4       # one tensor per layer (unbind)
    bank.current = None
    with torch.no_grad():
        model.model(PROBE)                            # tk's loss runs the decoder without the LM head's forward
    assert bank.current is not None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = grads(model)
    model.gradient_checkpointing_disable()
    model.eval()
    bank.detach()                                     # per-layer builds from here on
    bank.current = None
    own = grads(model)
    for a, b, c in zip(banked, checkpointed, own):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5)
    plain = unload(model)
    assert not hasattr(plain, "_tk_banks") and not plain._forward_pre_hooks


@pytest.mark.parametrize("name", ["vqc", "tq"])
def test_bank_gradient_is_one_stack_not_a_padded_gradient_per_layer(tiny_llama_dir, name):
    """Each layer gets its own tensor from the bank (unbind), so backward stacks the layers' gradients once;
    indexing the stacked unitaries made a zero-padded full-bank gradient per layer, added up one by one."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = adapted(tiny_llama_dir, name)
    perturb(model)
    made = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    loss = model(PROBE, labels=PROBE).loss
    [bank] = model._tk_banks
    full = (len(bank.current), *bank.current[0].shape)
    with Shapes():
        loss.backward()
    assert ("stack", full) in made                             # the one gradient of the whole bank
    assert not [op for op, shape in made if shape == full and op in ("select_backward", "zeros", "add", "add_")]


@pytest.mark.parametrize("name", ["vqc", "tq", "quanta"])
def test_bf16_stored_adapter_weights_still_compute_in_fp32(tiny_llama_dir, name):
    """DeepSpeed's bf16 mode casts every weight, the adapter's included, to bf16."""
    model = adapted(tiny_llama_dir, name)
    perturb(model)
    layer = next(iter(adapted_layers(model).values()))
    x = torch.randn(3, 64)
    expected = layer.delta(x)
    layer.delta.to(torch.bfloat16)
    reference = {k: v.float() for k, v in layer.delta.state_dict().items()}
    out = layer.delta(x)
    assert out.dtype == torch.float32
    layer.delta.float().load_state_dict(reference)
    torch.testing.assert_close(out, layer.delta(x))
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_quanta_bank_builds_the_gate_matrices_once_a_step_and_never_stale(tiny_llama_dir, monkeypatch):
    """On the fused path the gates' oriented (T, S) matrices are stacked once a forward for all layers, not
    a stack a gate a layer; after an in-place change of T (an optimizer step) a layer ignores the old ones."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from toolkit.model.adapters.quantum.bank import bank_unitary
    monkeypatch.setenv("TK_QUANTA_FUSED", "1")
    model = adapted(tiny_llama_dir, "quanta")
    perturb(model)
    layers = list(adapted_layers(model).values())
    stacks = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            stacks.append(func.overloadpacket.__name__ == "stack")
            return func(*args, **(kwargs or {}))

    with Count():
        model(PROBE)
    gates = len(layers[0].delta.T)
    assert sum(stacks) == gates and len(layers) > 1
    x = torch.randn(5, layers[0].in_features)
    delta = layers[0].delta
    assert bank_unitary(delta) is not None
    banked = delta(x)
    with torch.no_grad():
        delta.T[0].mul_(1.5)
    assert bank_unitary(delta) is None
    changed = delta(x)
    monkeypatch.setenv("TK_QUANTA_FUSED", "0")
    torch.testing.assert_close(changed, delta(x), atol=1e-5, rtol=1e-4)
    assert (changed - banked).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quanta_fused_path_in_a_model_equals_the_reference(tiny_llama_dir, monkeypatch, dtype):
    """The CUDA path of quanta (TK_QUANTA_FUSED=1 forces it on a CPU) inside a model, GQA v_proj cropped: an
    exact start, and after perturbing the same logits and gradients as the per-gate reference."""
    model = adapted(tiny_llama_dir, "quanta", dtype)
    monkeypatch.setenv("TK_QUANTA_FUSED", "1")
    assert torch.equal(logits(model), logits(base(tiny_llama_dir, dtype)))
    perturb(model)
    results = []
    for fused in ("1", "0"):
        monkeypatch.setenv("TK_QUANTA_FUSED", fused)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = model(PROBE, labels=PROBE)
        out.loss.backward()
        results.append([out.logits.detach().float()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("name", ["vqc", "tq", "quanta"])
def test_no_bank_entry_outlives_a_fused_optimizer_step_or_an_assigned_load(tiny_llama_dir, monkeypatch, name):
    """Fused AdamW rewrites the parameters without bumping their version counter, and
    load_state_dict(assign=True) swaps the tensors: after either, a layer called on its own builds from the
    current parameters instead of taking the last model forward's entry (review finding)."""
    from toolkit.model.adapters.quantum.bank import bank_unitary
    monkeypatch.setenv("TK_QUANTA_FUSED", "1")
    model = adapted(tiny_llama_dir, name)
    perturb(model)
    delta = next(iter(adapted_layers(model).values())).delta
    model(PROBE, labels=PROBE).loss.backward()
    assert bank_unitary(delta) is not None
    params = [p for p in model.parameters() if p.requires_grad]
    versions = [p._version for p in params]
    torch.optim.AdamW(params, lr=0.1, fused=True).step()
    assert [p._version for p in params] == versions  # the counter alone cannot see this step
    assert bank_unitary(delta) is None
    with torch.no_grad():
        model(PROBE)
    assert bank_unitary(delta) is not None
    state = {k: v.clone() + 0.01 for k, v in delta.state_dict().items()}
    delta.load_state_dict(state, assign=True)
    assert bank_unitary(delta) is None
