"""``compile=True`` on a machine without CUDA (the blocks run eagerly, say so, train the same numbers), and which
kind of gradient checkpointing compiled blocks get."""
import pytest
import torch
from mmengine.logging import MMLogger
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from toolkit.model.sft import SupervisedFinetune, compile_blocks


def test_compile_without_cuda_falls_back_to_the_plain_path(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    MMLogger.get_instance("tk-test-compile")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for compile in (False, True):  # without CUDA compile=True changes nothing, checkpointing included
        torch.manual_seed(0)
        llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = SupervisedFinetune(llm, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                                   gradient_checkpointing=True, compile=compile)
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
        loss = model(ids, ids.clone())["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * llm.config.num_hidden_layers
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0 and torch.equal(grad, grads[1][name]), name
    assert "compile=True: no CUDA device, so the blocks run eagerly" in capsys.readouterr().out


def test_compile_blocks_finds_every_decoder_layer(tiny_llama_dir):
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert compile_blocks(llm) == llm.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in llm.model.layers)


def _checkpoint_kind(model) -> bool:
    """use_reentrant of the checkpoint function transformers put on the decoder layers."""
    funcs = {getattr(m, "_gradient_checkpointing_func", None) for m in model.modules()} - {None}
    assert len(funcs) == 1
    return next(iter(funcs)).keywords["use_reentrant"]


def _layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointed_in_forward(layer) -> bool:
    from toolkit.model.selective_checkpoint import forward_wrapper
    return forward_wrapper(layer) == "_forward_checkpointed"


def test_compiled_peft_blocks_checkpoint_inside_their_graph_and_circuit_adapters_never(tiny_llama_dir, monkeypatch):
    """With blocks compiled on CUDA (simulated: no compile runs here) and transformers checkpointing around
    the call (5.17), a peft adapter's blocks carry a non-reentrant checkpoint inside their forward (traced into
    the compiled graph) and transformers' own is off; vqc, and uncompiled models, keep transformers'
    non-reentrant checkpoint. No longer the reentrant kind around the compiled call, whose recompute re-ran the
    compiled graph from Python inside the autograd engine (slower: sft.checkpoint_in_compiled_graph)."""
    import toolkit.model.offload as offload
    import toolkit.model.sft as sft
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft, "compile_blocks", lambda model, options=None: 0)
    monkeypatch.setattr(offload, "checkpoint_inside_compiled_block", lambda: False)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for name, adapter in [("lora", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)),
                          ("vqc", dict(type="vqc", n_qubits=2, n_layers=1, target_modules=["q_proj", "v_proj"]))]:
        for compile in (True, False, dict()):
            llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
            model = SupervisedFinetune(llm, adapter, gradient_checkpointing=True, compile=compile).train()
            layers = _layers(model)
            assert _checkpoint_kind(model) is False
            seen[name, str(compile)] = (all(_checkpointed_in_forward(m) and not m.gradient_checkpointing for m in layers)
                                        if _checkpointed_in_forward(layers[0]) else
                                        "hf" if all(m.gradient_checkpointing for m in layers) else "mixed")
        model(ids, ids.clone())["loss"].backward()  # the last one: vqc or lora, compiled
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert seen == {("lora", "True"): True, ("lora", "False"): "hf", ("lora", "{}"): True,
                    ("vqc", "True"): "hf", ("vqc", "False"): "hf", ("vqc", "{}"): "hf"}


def test_under_zero3_the_in_graph_checkpoint_moves_around_the_compiled_call(tiny_llama_dir):
    """DeepSpeed's hooks become graph breaks, and dynamo cannot break a graph inside a checkpoint: the blocks
    get their own forward back and a non-reentrant checkpoint around the (here: stand-in) compiled call, and
    train the numbers of transformers' checkpoint."""
    import functools

    from toolkit.model.blocks import _checkpoint_outside
    from toolkit.model.selective_checkpoint import checkpoint_inside_forward
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(move):
        torch.manual_seed(0)
        llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = SupervisedFinetune(llm, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "down_proj"],
                                                   init_lora_weights=False), gradient_checkpointing=True).train()
        calls = []
        if move:
            assert checkpoint_inside_forward(model.llm) == llm.config.num_hidden_layers
            for layer in _layers(model):  # stands in for block.compile(): counts the compiled calls
                plain = functools.partial(torch.nn.Module._call_impl, layer)
                layer._compiled_call_impl = lambda *a, _plain=plain, **k: calls.append(1) or _plain(*a, **k)
            assert _checkpoint_outside(model.llm) == llm.config.num_hidden_layers
            assert not any(_checkpointed_in_forward(m) or m.gradient_checkpointing for m in _layers(model))
        torch.manual_seed(1)
        loss = model(ids, ids.clone())["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    (loss_a, grads_a, _), (loss_b, grads_b, calls) = step(False), step(True)
    assert calls == 2 * 2  # forward and the recompute, per layer of the tiny llama (2 layers)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_circuit_adapter_with_reentrant_checkpointing_fails_which_is_why_it_is_not_used(tiny_llama_dir):
    """The control for the test above: force the reentrant kind on vqc and the second layer's backward
    meets the freed unitary graph."""
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    llm.enable_input_require_grads()
    model = SupervisedFinetune(llm, dict(type="vqc", n_qubits=2, n_layers=1, target_modules=["q_proj"])).train()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        model(ids, ids.clone())["loss"].backward()


def test_kbit_preparation_checkpoints_circuit_adapters_the_non_reentrant_way(tiny_llama_dir):
    """peft's QLoRA preparation checkpoints the reentrant way unless told otherwise, which breaks vqc as
    above; tk tells it. (A bf16 model flagged as 4-bit: peft's preparation is the same code either way.)"""
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    llm.is_loaded_in_4bit = True
    model = SupervisedFinetune(llm, dict(type="vqc", n_qubits=2, n_layers=1, target_modules=["q_proj"]),
                               gradient_checkpointing=True).train()
    assert _checkpoint_kind(model) is False
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, ids.clone())["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _fake_deepspeed_hook(module, args):
    """Stands in for DeepSpeed's weight-fetching pre-hook (the wrapping picks hooks by their module name)."""


_fake_deepspeed_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"


def test_deepspeed_hooks_are_wrapped_before_the_first_call_even_a_generate(tiny_llama_dir, monkeypatch):
    """A compiled model wraps DeepSpeed's hooks on its first call, whichever comes first: EvaluateChatHook's
    generate runs before the first training step. Hooks of other libraries, and hooks without a module name,
    are left alone."""
    import toolkit.model.sft as sft
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft, "compile_blocks", lambda model, options=None: 0)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = SupervisedFinetune(llm, LoraConfig(r=4, target_modules=["q_proj"]), compile=True).eval()
    q_proj = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    nameless = {}
    exec("def nameless(module, args): pass", nameless)  # __module__ is None: no crash
    for hook in (_fake_deepspeed_hook, nameless["nameless"], lambda module, args: None):
        q_proj.register_forward_pre_hook(hook)
    embeddings = model.llm.get_input_embeddings()
    assert len(embeddings._forward_pre_hooks) == 1  # tk's, until the first call
    model.llm.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    wrapped = [getattr(h, "_tk_eager", False) for h in q_proj._forward_pre_hooks.values()]
    assert wrapped == [True, False, False]
    assert len(embeddings._forward_pre_hooks) == 0


def test_without_compile_nothing_is_wrapped(tiny_llama_dir):
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = SupervisedFinetune(llm, LoraConfig(r=4, target_modules=["q_proj"])).train()
    q_proj = model.llm.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.register_forward_pre_hook(_fake_deepspeed_hook)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    model(ids, ids.clone())
    assert [getattr(h, "_tk_eager", False) for h in q_proj._forward_pre_hooks.values()] == [False]


def test_selective_checkpoint_in_compiled_blocks_under_zero3_says_they_run_eagerly(tiny_llama_dir, capsys):
    """recompute_attention=False keeps its checkpoint inside the compiled call, where DeepSpeed's wrapped hooks
    break the graph: dynamo runs those blocks eagerly, and tk says so (compiled blocks simulated)."""
    from toolkit.model.blocks import keep_deepspeed_hooks_out_of_compile
    MMLogger.get_instance("tk-test-selective-zero3")
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = SupervisedFinetune(llm, LoraConfig(r=4, target_modules=["q_proj"]), gradient_checkpointing=True,
                               recompute_attention=False)
    layers = model.llm.base_model.model.model.layers
    for layer in layers:
        layer._compiled_call_impl = layer._call_impl
    layers[0].self_attn.q_proj.register_forward_pre_hook(_fake_deepspeed_hook)
    assert keep_deepspeed_hooks_out_of_compile(model.llm) == 1
    assert f"so dynamo runs these {len(layers)} blocks eagerly" in capsys.readouterr().out
