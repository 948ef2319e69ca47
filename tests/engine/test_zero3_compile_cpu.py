"""Compiled blocks under DeepSpeed ZeRO-3: DeepSpeed's parameter hooks stay out of the traced code.

One CPU process (gloo), a 4-layer llama in fp32, ZeRO-3 with every weight partitioned, four training steps.
Dynamo runs with its real guards and a backend that runs each graph eagerly and counts its calls (no C++
compiler needed; the guards and recompiles are the backend-independent part) and is told to fail instead of
silently running a block eagerly once it hits its recompile limit. Without tk's wrapping that failure comes (the
control); with it the blocks compile into a few graphs that run every step, and the losses equal the
uncompiled ZeRO-3 run exactly (same ops, same order). With gradient checkpointing too: transformers 5.2x
checkpoints inside the compiled call, where a graph break would make dynamo run the whole block eagerly
(silently: no compiled graph runs, the second control); tk moves the checkpoint around the compiled call.
"""
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
    mode, checkpointing = sys.argv[1], sys.argv[2] == "1"
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=256, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls, linear_graphs = [0], [0]

    def counting(graph, inputs):
        # a graph holding a linear: dynamo traced DeepSpeed's F.linear replacement (an autograd.Function)
        if any("linear" in str(node.target) or "autograd_function" in str(node.target) for node in graph.graph.nodes):
            linear_graphs[0] += 1

        def run(*args):
            calls[0] += 1
            return graph.forward(*args)
        return run

    if mode != "eager":
        for block in transformer_blocks(model):
            block.compile(backend=counting)
    if mode == "wrapped_checkpoint_inside":
        blocks._checkpoint_outside = lambda model: 0
    if mode == "wrapped_linear_traced":
        blocks._linear_out_of_compile = lambda: False
    ds = json.load(open("configs/deepspeed/zero3.json"))
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
              bf16={"enabled": False}, fp16={"enabled": False})
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the norms too
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds)
    wrapped = keep_deepspeed_hooks_out_of_compile(engine.module) if mode.startswith("wrapped") else 0
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    losses, graph_calls = [], []
    for _ in range(4):
        before = calls[0]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        graph_calls.append(calls[0] - before)
    print("RESULT", json.dumps(dict(losses=losses, wrapped=wrapped, graph_calls=graph_calls,
                                    linear_graphs=linear_graphs[0])))
''')


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
