"""Compiled blocks under DeepSpeed ZeRO-3: DeepSpeed's parameter hooks stay out of the traced code.

One CPU process (gloo), a 4-layer llama in fp32, ZeRO-3 with every weight partitioned, four training steps.
Dynamo runs with its real guards and a backend that runs each graph eagerly and counts its calls (no C++
compiler needed; the guards and recompiles are the backend-independent part) and is told to fail instead of
silently running a block eagerly once it hits its recompile limit. Without tk's wrapping that failure comes (the
control); with it the blocks compile into a few graphs that run every step, and the losses equal the
uncompiled ZeRO-3 run exactly (same ops, same order). With gradient checkpointing too: transformers 5.2x
checkpoints inside the compiled call, where a graph break would make dynamo run the whole block eagerly
(silently: no compiled graph runs, the second control); tk moves the checkpoint around the compiled call.

Blocks DeepSpeed fetches whole (tk's default with compiled blocks, toolkit/model/zero3_blocks.py) run through
AOTAutograd with Inductor's partitioner, so the tensors a compiled graph saves for backward are real: each
block compiles as one graph with its linears and its checkpoint inside, trains the eager losses, and saves
its weights for backward as the parameters themselves, never as a tensor aliasing the gathered copy (which
would keep every block's gathered weights alive until backward, the whole model on each GPU).
"""
import functools
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_process import run_one_process  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolkit.model.blocks import keep_deepspeed_hooks_out_of_compile, transformer_blocks
    from toolkit.model import blocks
    from toolkit.model import selective_checkpoint, zero3_blocks
    mode, checkpointing = sys.argv[1], sys.argv[2] == "1"
    whole, lora = mode.startswith("whole"), mode.endswith("_lora")
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=256, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:  # as SupervisedFinetune: frozen base, LoRA on every projection
        from peft import LoraConfig, get_peft_model
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    calls, linear_graphs = [0], [0]

    def counting(graph, inputs):
        # a graph holding a linear: dynamo traced DeepSpeed's F.linear replacement (an autograd.Function)
        if any("linear" in str(node.target) or "autograd_function" in str(node.target) for node in graph.graph.nodes):
            linear_graphs[0] += 1

        def run(*args):
            calls[0] += 1
            return graph.forward(*args)
        return run

    mm_nodes = [0]

    def counting_aot(graph, inputs):  # forward and backward graphs after AOTAutograd's partition
        mm_nodes[0] = max(mm_nodes[0], sum("aten.mm" in str(node.target) for node in graph.graph.nodes))
        return counting(graph, inputs)

    if whole:
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        backend = aot_autograd(fw_compiler=counting_aot, bw_compiler=counting_aot,
                               partition_fn=min_cut_rematerialization_partition)
    else:
        backend = counting
    if not mode.startswith("eager"):
        for block in transformer_blocks(model):
            block.compile(backend=backend)
    if whole:  # what SupervisedFinetune does with compile=True on CUDA under the GPU machine's transformers 5.17,
        zero3_blocks.mark_blocks_as_zero3_leaves(model)  # where the checkpoint moves inside (and the hook that
        if checkpointing:  # makes the embeddings' output require grad goes: the first block's input needs none)
            selective_checkpoint.checkpoint_inside_forward(model)
    if mode == "whole_inputs_without_grad_lora":
        zero3_blocks.block_inputs_require_grad = lambda model: False
    if mode == "wrapped_checkpoint_inside":
        blocks._checkpoint_outside = lambda model, keep_inside=(): 0
    if mode == "wrapped_linear_traced":
        blocks._linear_out_of_compile = lambda: False
    ds = json.load(open("configs/deepspeed/zero3.json"))
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
              bf16={"enabled": False}, fp16={"enabled": False})
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the norms too
    # the preset's "auto" fields as tk's strategy fills them (blocks of 41k parameters: DeepSpeed's 5e7)
    ds.update(communication_data_type="fp32")
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 50_000_000
    if whole and not mode.startswith("whole_ds_linear"):  # what tk's strategy sets (a user's JSON may not)
        ds["zero_optimization"]["memory_efficient_linear"] = False
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trained, lr=1e-3), config=ds)
    wrapped = keep_deepspeed_hooks_out_of_compile(engine.module) if mode.startswith(("wrapped", "whole")) else 0
    weights = [w for block in transformer_blocks(model) for w in block.parameters()]  # lm_head's is not a block's
    aliases, by_reference = [0], [0]

    def inside(tensor, weight):  # a view into the weight's elements (DeepSpeed gathers several into one buffer)
        start = weight.storage_offset()
        return (weight.numel() and tensor.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
                and start <= tensor.storage_offset() < start + weight.numel())

    def pack(tensor):  # outermost: sees what no inner hook took; a parameter itself is kept by reference
        if any(tensor is w for w in weights):
            by_reference[0] += 1
        elif tensor.numel() and any(inside(tensor, w) for w in weights):
            aliases[0] += 1
        return tensor
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    losses, graph_calls = [], []
    for _ in range(4):
        before = calls[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        graph_calls.append(calls[0] - before)
    print("RESULT", json.dumps(dict(losses=losses, wrapped=wrapped, graph_calls=graph_calls,
                                    linear_graphs=linear_graphs[0], mm_nodes=mm_nodes[0], aliases=aliases[0],
                                    by_reference=by_reference[0],
                                    leaves=sum(getattr(m, "_z3_leaf", False) for m in model.modules()))))
''')


@functools.cache  # the eager references serve several tests: each mode runs once per session
def _run(mode, checkpointing=False):
    return run_one_process(SCRIPT, mode, int(checkpointing))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_deepspeed_hooks_wrapped_compile_without_recompiles_and_train_the_same(checkpointing):
    eager_run, eager = _run("eager", checkpointing)
    assert eager is not None, eager_run.stderr[-3000:]
    wrapped_run, wrapped = _run("wrapped", checkpointing)
    assert wrapped is not None, wrapped_run.stderr[-3000:]
    assert wrapped["wrapped"] > 0
    # DeepSpeed's F.linear replacement is called, not traced (the GPU machine's dynamo compiled it per shape
    # until its recompile limit): no compiled graph holds a linear
    assert wrapped["linear_graphs"] == 0, wrapped
    # every step runs compiled graphs: several per block (between the weight fetches), more with the recompute
    assert min(wrapped["graph_calls"]) >= 4 * 4, wrapped["graph_calls"]
    assert wrapped["losses"] == eager["losses"] and eager["losses"][-1] < eager["losses"][0]
    control_run, control = _run("traced", checkpointing)  # DeepSpeed's hooks traced: dynamo's recompile limit
    assert control is None and "recompile_limit" in control_run.stderr, control_run.stderr[-3000:]


def test_deepspeed_linear_left_to_dynamo_is_traced_into_graphs():
    """The control for the linear wrapping: without it, dynamo traces DeepSpeed's F.linear replacement into
    compiled graphs (on the GPU machine's torch 2.11, as frames of their own, until the recompile limit)."""
    run, result = _run("wrapped_linear_traced")
    assert result is not None, run.stderr[-3000:]
    assert result["linear_graphs"] > 0, result


def test_checkpoint_left_inside_the_compiled_call_runs_no_compiled_graph():
    """The control for the checkpoint move: left inside (transformers 5.2x), the graph break in the checkpoint
    makes dynamo run every block eagerly, with no error and no recompile."""
    from toolkit.model.offload import checkpoint_inside_compiled_block
    if not checkpoint_inside_compiled_block():
        pytest.skip("this transformers checkpoints around the compiled call: nothing to move")
    run, result = _run("wrapped_checkpoint_inside", checkpointing=True)
    assert result is not None, run.stderr[-3000:]
    assert result["graph_calls"] == [0, 0, 0, 0]


def test_whole_fetched_blocks_compile_as_one_graph_and_keep_no_gathered_weight():
    """tk's default with compiled blocks under ZeRO-3: each decoder layer is a DeepSpeed leaf, compiles with its
    seven projections and its checkpoint inside one graph, trains the eager losses, and what the compiled graphs
    save for backward holds no gathered weight: the weights are saved as the parameters themselves, whose
    gathered data DeepSpeed swaps out after the forward and in again before the backward."""
    eager_run, eager = _run("eager", checkpointing=True)
    assert eager is not None, eager_run.stderr[-3000:]
    run, whole = _run("whole", checkpointing=True)
    assert whole is not None, run.stderr[-3000:]
    assert whole["leaves"] == 4 and whole["wrapped"] > 0
    assert whole["mm_nodes"] >= 7, whole  # the projections are in the compiled graph, not between graph pieces
    # a forward and a backward graph per block and step (the recompute is inside the backward graph)
    assert min(whole["graph_calls"]) >= 2 * 4, whole["graph_calls"]
    # 9 weights a block (7 projections, 2 norms), each saved by reference for the in-graph recompute
    assert whole["by_reference"] == 4 * 9 * 4 and whole["aliases"] == 0, whole
    assert whole["losses"] == eager["losses"] and eager["losses"][-1] < eager["losses"][0]


def test_whole_fetched_lora_blocks_train_like_eager():
    """LoRA under ZeRO-3 with blocks fetched whole: the first block's input needs no gradient (frozen embeddings),
    so DeepSpeed's full backward hook on that leaf would fire before the block's backward, and the block's frozen
    weights were released under it (on the H200: "size of tensor a (0) must match ... 256" in backward)."""
    eager_run, eager = _run("eager_lora", checkpointing=True)
    assert eager is not None, eager_run.stderr[-3000:]
    run, whole = _run("whole_lora", checkpointing=True)
    assert whole is not None, run.stderr[-3000:]
    assert whole["leaves"] == 4 and whole["mm_nodes"] >= 7 and whole["aliases"] == 0, whole
    # the compiled graphs order LoRA's fp32 sums differently: 1e-7 relative apart
    assert max(abs(a - b) / a for a, b in zip(whole["losses"], eager["losses"])) < 1e-6, (whole, eager)
    assert eager["losses"][-1] < eager["losses"][0]
    control_run, control = _run("whole_inputs_without_grad_lora", checkpointing=True)
    assert control is None and "must match the size of tensor b" in control_run.stderr, control_run.stderr[-3000:]
    # a user's memory_efficient_linear: true keeps DeepSpeed's linear: the blocks are still fetched whole (graph
    # pieces between the linears, checkpoint around the compiled call), and the first block's input still needs
    # its gradient (the review found this crash)
    ds_linear_run, ds_linear = _run("whole_ds_linear_lora", checkpointing=True)
    assert ds_linear is not None, ds_linear_run.stderr[-3000:]
    assert ds_linear["leaves"] == 4 and ds_linear["mm_nodes"] == 0, ds_linear
    assert max(abs(a - b) / a for a, b in zip(ds_linear["losses"], eager["losses"])) < 1e-6, (ds_linear, eager)
