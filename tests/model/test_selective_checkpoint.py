"""recompute_attention=False: checkpointing keeps the attention kernel's outputs, and trains the same numbers.

Tiny llama (2 layers) with LoRA on all 7 projections, fp32 on a CPU, sdpa attention, one forward + backward.
The attention kernel is counted at dispatch (a TorchDispatchMode sees each aten op once). Tolerance: none.
The saved-attention path runs the same kernels on the same inputs as full checkpointing, and checkpoint
restores the RNG state for the recompute, so loss and every LoRA gradient are bit-equal, with LoRA dropout
0.1 too (a control without the RNG state restored shows the test sees a different mask).
"""
import contextlib
import re

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy
from transformers import AutoModelForCausalLM

from toolkit.errors import UserError
from toolkit.model import selective_checkpoint
from toolkit.model.long_context import apply_long_context
from toolkit.model.selective_checkpoint import ATTENTION_OPS
from toolkit.model.sft import SupervisedFinetune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2  # the tiny llama's


def _model(folder, dropout=0.1, quantized=False, attn="sdpa", **options):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    if quantized:  # SupervisedFinetune's QLoRA path: peft's k-bit preparation, reentrant checkpointing
        llm.is_loaded_in_4bit = True
    # init_lora_weights=False: B random too (from zero, A would get no gradient)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                init_lora_weights=False)
    return SupervisedFinetune(llm, lora, gradient_checkpointing=True, **options).train()


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _step(model, seed=5, count=True):
    """(loss, {trainable name: grad}, attention kernel calls) of one forward + backward. ``count=False`` for
    compiled blocks: dynamo does not compile a frame that is first called under a dispatch mode."""
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    counter = _CountAttention()
    with counter if count else contextlib.nullcontext():
        loss = model(ids, labels)["loss"]
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, counter.count


def _assert_equal(ours, reference):
    assert torch.equal(ours[0], reference[0])
    assert ours[1].keys() == reference[1].keys() and len(ours[1]) == LAYERS * 7 * 2
    for name, grad in reference[1].items():
        assert torch.equal(ours[1][name], grad), name
    assert all(g.abs().sum() > 0 for g in ours[1].values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_attention_runs_once_per_layer_and_the_numbers_stay(tiny_llama_dir, dropout):
    reference = _step(_model(tiny_llama_dir, dropout))
    ours = _step(_model(tiny_llama_dir, dropout, recompute_attention=False))
    assert reference[2] == 2 * LAYERS  # forward and backward's recompute
    assert ours[2] == LAYERS  # forward only
    _assert_equal(ours, reference)


def test_the_recompute_draws_the_forwards_dropout_masks(tiny_llama_dir, monkeypatch):
    """The control for the test above: without the RNG state restored, LoRA dropout's masks in the
    recompute differ from forward's, and the gradients with them."""
    reference = _step(_model(tiny_llama_dir, 0.1))
    model = _model(tiny_llama_dir, 0.1, recompute_attention=False)
    checkpoint = selective_checkpoint.checkpoint
    monkeypatch.setattr(selective_checkpoint, "checkpoint",
                        lambda *args, **kw: checkpoint(*args, **kw, preserve_rng_state=False))
    ours = _step(model)
    assert torch.equal(ours[0], reference[0])  # forward draws the same masks
    assert not all(torch.equal(ours[1][n], g) for n, g in reference[1].items())


def test_qlora_path_replaces_peft_reentrant_checkpoint(tiny_llama_dir):
    """peft's k-bit preparation checkpoints the reentrant way; the switch needs (and sets) non-reentrant."""
    reference = _step(_model(tiny_llama_dir, 0.1, quantized=True))
    model = _model(tiny_llama_dir, 0.1, quantized=True, recompute_attention=False)
    layers = model.llm.base_model.model.model.layers
    assert not any(layer.gradient_checkpointing for layer in layers)  # HF's (reentrant) checkpoint is off
    ours = _step(model)
    assert reference[2] == 2 * LAYERS and ours[2] == LAYERS
    _assert_equal(ours, reference)


def test_composes_with_offload_and_tiled_mlp(tiny_llama_dir):
    offloaded = _model(tiny_llama_dir, 0.1, offload_activations=True)
    reference = _step(offloaded)
    model = _model(tiny_llama_dir, 0.1, offload_activations=True, recompute_attention=False)
    ours = _step(model)
    assert ours[2] == LAYERS
    _assert_equal(ours, reference)
    # the same host copies: each layer's input, once a step; the saved attention outputs stay on the device
    assert model.activation_offloader.packed_count == offloaded.activation_offloader.packed_count == LAYERS
    assert model.activation_offloader.packed_bytes == offloaded.activation_offloader.packed_bytes > 0
    tiled = _step(_model(tiny_llama_dir, 0.0, offload_activations=True, tiled_mlp=16))
    ours = _step(_model(tiny_llama_dir, 0.0, offload_activations=True, tiled_mlp=16, recompute_attention=False))
    assert ours[2] == LAYERS
    _assert_equal(ours, tiled)


def test_offloaded_block_inputs_are_freed_after_forward(tiny_llama_dir):
    """The first block's input too (the embeddings' output: no hook makes it a leaf that stays alive)."""
    import gc
    import weakref
    model = _model(tiny_llama_dir, offload_activations=True, recompute_attention=False)
    offloader, alive = model.activation_offloader, []
    pack = offloader.pack
    offloader.pack = lambda tensor: (alive.append(weakref.ref(tensor)) if tensor.numel() else None, pack(tensor))[1]
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
    loss = model(ids, ids.clone())["loss"]
    gc.collect()
    assert len(alive) == LAYERS and all(ref() is None for ref in alive)
    loss.backward()


def _attention_forwards(graph) -> int:
    """Attention kernels in an FX graph, also those AOTAutograd wraps to replay with a saved RNG state."""
    return sum(node.target in ATTENTION_OPS or any(arg in ATTENTION_OPS for arg in node.args)
               for node in graph.nodes if node.op == "call_function")


def _recording_backend():
    """A compile backend (AOTAutograd, no Inductor) that records how many attention forwards each forward and
    backward graph holds (``graphs``) and each time a graph runs (``ran``)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs, ran = {"forward": [], "backward": []}, []

    def keep(kind):
        def compiler(gm, inputs):
            ops = _attention_forwards(gm.graph)
            graphs[kind].append(ops)

            def run(*args):
                ran.append(ops)
                return gm.forward(*args)
            return make_boxed_func(run)
        return compiler

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    return backend, graphs, ran


@pytest.mark.parametrize("recompute,tiles", [(True, None), (False, None), (False, 16)],
                         ids=["recompute", "save", "save+tiled_mlp"])
def test_compiled_block_applies_the_policy_in_its_graph(tiny_llama_dir, recompute, tiles):
    """Blocks compiled first (as SupervisedFinetune orders it): the selective checkpoint traces into each
    block's graph without a break, AOTAutograd's backward graph has no attention forward, the compiled
    graphs run the attention once per layer and step (the control, full checkpointing, twice: in the backward
    graph where transformers 5.2x checkpoints inside the compiled call, by running the forward graph again
    where 5.17 checkpoints around it), and the eager numbers come out (aot_eager: no Inductor, CPU)."""
    from torch._dynamo.utils import counters
    backend, graphs, ran = _recording_backend()
    reference = _step(_model(tiny_llama_dir, 0.0))
    torch._dynamo.reset()
    counters.clear()
    model = _model(tiny_llama_dir, 0.0)
    layers = model.llm.base_model.model.model.layers
    for layer in layers:
        layer.compile(backend=backend)
    if not recompute:
        apply_long_context(model.llm, False, tiles, recompute_attention=False)
    ours = _step(model, count=False)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs["forward"] and set(graphs["forward"]) == {1}, graphs
    if not recompute:
        assert set(graphs["backward"]) == {0}, graphs
    assert sum(ran) == (2 if recompute else 1) * LAYERS, (ran, graphs)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=0)
    for name, grad in reference[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---- bad combinations: one line each ---------------------------------------------------------------------
def _one_line_error(call, message):
    with pytest.raises(UserError, match=re.escape(message)) as error:
        call()
    assert "\n" not in str(error.value)


def test_without_gradient_checkpointing_is_one_clear_error(tiny_llama_dir):
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    _one_line_error(lambda: SupervisedFinetune(llm, recompute_attention=False),
                    "model.recompute_attention=False chooses what gradient checkpointing recomputes; "
                    "set model.gradient_checkpointing=True")


def test_attention_that_is_not_one_kernel_is_one_clear_error(tiny_llama_dir):
    _one_line_error(lambda: _model(tiny_llama_dir, attn="eager", recompute_attention=False),
                    "runs attn_implementation='eager'; load it with attn_implementation='sdpa'")


def test_attention_dropout_is_one_clear_error(tiny_llama_dir):
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa", attention_dropout=0.1)
    _one_line_error(lambda: SupervisedFinetune(llm, gradient_checkpointing=True, recompute_attention=False),
                    "needs attention dropout 0 (the model's config has attention_dropout=0.1)")


def test_gpt2_style_attention_dropout_is_one_clear_error(tmp_path):
    """GPT-2, GPT-J and StarCoder call it attn_pdrop: the check must not read only llama's name."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, attn_pdrop=0.1)).save_pretrained(
        tmp_path / "gpt2")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", attn_implementation="sdpa")
    _one_line_error(lambda: SupervisedFinetune(llm, gradient_checkpointing=True, recompute_attention=False),
                    "needs attention dropout 0 (the model's config has attn_pdrop=0.1)")


@pytest.mark.parametrize("op_name", selective_checkpoint.ATTENTION_OP_NAMES)
def test_policy_keeps_only_attention_kernels_that_draw_no_random_numbers(op_name):
    """On CUDA sdpa runs flash or memory-efficient attention with dropout_p > 0 where a model has attention
    dropout; such a kernel must be recomputed (skipping its draws would shift every later mask), whichever
    way the argument is passed."""
    if not hasattr(torch.ops.aten, op_name):
        pytest.skip(f"this torch has no aten.{op_name}")
    op = getattr(torch.ops.aten, op_name).default
    names = [a.name for a in op._schema.arguments]
    index = names.index("dropout_p")
    policy = selective_checkpoint.save_attention_policy
    args = [None] * index
    assert policy(None, op, *args, 0.0) == CheckpointPolicy.MUST_SAVE
    assert policy(None, op, *args, 0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, op, *args, dropout_p=0.1) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, op, *args[:3]) == CheckpointPolicy.MUST_SAVE  # dropout_p left at its default 0
    assert policy(None, torch.ops.aten.mm.default, None, None) == CheckpointPolicy.PREFER_RECOMPUTE


def test_compiled_blocks_offload_only_their_inputs(tiny_llama_dir):
    """recompute_attention=False with offload_activations=True in compiled blocks (compile=True compiles only
    on CUDA, so the blocks are compiled by hand here, without Inductor, as SupervisedFinetune orders it): the
    selective checkpoint stays inside the compiled graph (no graph break, no attention forward in backward),
    the offload hooks go around the compiled call and move exactly each block's input, not the attention
    outputs or the weights the graph saves beside it, and the eager numbers come out."""
    from torch._dynamo.utils import counters
    backend, graphs, ran = _recording_backend()
    eager, inputs = _model(tiny_llama_dir, 0.0, recompute_attention=False), []
    for layer in eager.llm.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    reference = _step(eager, count=False)
    torch._dynamo.reset()
    counters.clear()
    model = _model(tiny_llama_dir, 0.0)
    for layer in model.llm.base_model.model.model.layers:
        layer.compile(backend=backend)
    offloader, _ = apply_long_context(model.llm, True, None, recompute_attention=False)
    packed = []
    pack = offloader.pack

    def spy(tensor):
        item = pack(tensor)
        packed.append(item)
        return item
    offloader.pack = spy
    ours = _step(model, count=False)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert set(graphs["forward"]) == {1} and set(graphs["backward"]) == {0}, graphs
    assert sum(ran) == LAYERS, (ran, graphs)  # each layer's attention ran once
    hidden = model.llm.config.hidden_size
    assert offloader.packed_count == LAYERS and offloader.packed_bytes == LAYERS * 2 * 40 * hidden * 4
    for item, block_input in zip(packed, inputs, strict=True):  # each block's input, copied
        torch.testing.assert_close(item.host, block_input, rtol=1e-6, atol=1e-7)
    assert all(item.used and item.device_copy is None for item in packed)  # brought back for backward, once
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=0)
    for name, grad in reference[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("keeps", [True, False], ids=["keeps", "keeps_nothing"])
def test_a_switch_that_kept_nothing_says_so_once(tiny_llama_dir, monkeypatch, keeps):
    """Where sdpa takes its math fallback no attention kernel runs, the policy keeps nothing and the switch
    changes nothing: one warning after the first training step (stood in for by a policy that knows no
    attention op), none where it kept the kernels."""
    import logging

    from mmengine.logging import MMLogger
    if not keeps:
        monkeypatch.setattr(selective_checkpoint, "ATTENTION_OPS", frozenset())
    model = _model(tiny_llama_dir, recompute_attention=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        for _ in range(2):
            _step(model)
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if "kept no attention output" in r.getMessage()]
    assert len(warnings) == (0 if keeps else 1), warnings


@pytest.mark.parametrize("options, message", [
    (dict(offload_activations=True, tile_tokens=None), "model.offload_activations=True: Plain has no decoder layer"),
    (dict(offload_activations=False, tile_tokens=None, recompute_attention=False),
     "model.recompute_attention=False: Plain has no decoder layer")])
def test_a_model_without_checkpointed_layers_is_one_clear_error(options, message):
    """Checkpointing is on (check_options requires it) but the layers are not transformers' checkpointed
    kind (remote-code models): the line says that, not "set gradient_checkpointing=True"."""
    from types import SimpleNamespace

    class Plain(torch.nn.Sequential):
        config = SimpleNamespace(_attn_implementation="sdpa")
    _one_line_error(lambda: apply_long_context(Plain(torch.nn.Linear(2, 2)), **options), message)
