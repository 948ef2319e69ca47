"""Compiled blocks under DeepSpeed ZeRO-3: DeepSpeed's parameter hooks stay out of the traced code.

One CPU process (gloo), a 4-layer llama in fp32, ZeRO-3 with every weight partitioned, four training steps.
Dynamo runs with its real guards and the "eager" backend (no C++ compiler needed; the guards and recompiles
are the backend-independent part) and is told to fail instead of silently running a block eagerly once it hits
its recompile limit. Without tk's wrapping that failure comes (the control); with it the blocks compile into a
few graphs and the losses equal the uncompiled ZeRO-3 run exactly (same ops, same order).
"""
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "gpu"))
from gpu_helpers import free_port  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolkit.model.blocks import keep_deepspeed_hooks_out_of_compile, transformer_blocks
    mode = sys.argv[1]
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=256, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if mode != "eager":
        for block in transformer_blocks(model):
            block.compile(backend="eager")
    ds = json.load(open("configs/deepspeed/zero3.json"))
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
              bf16={"enabled": False}, fp16={"enabled": False})
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the norms too
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=ds)
    wrapped = keep_deepspeed_hooks_out_of_compile(engine.module) if mode == "wrapped" else 0
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(4):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print("RESULT", json.dumps(dict(losses=losses, wrapped=wrapped, graphs=graphs)))
''')


def _run(mode):
    import os
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return done, (json.loads(lines[0][7:]) if lines else None)


def test_deepspeed_hooks_wrapped_compile_without_recompiles_and_train_the_same():
    eager_run, eager = _run("eager")
    assert eager is not None, eager_run.stderr[-3000:]
    wrapped_run, wrapped = _run("wrapped")
    assert wrapped is not None, wrapped_run.stderr[-3000:]
    assert wrapped["wrapped"] > 0 and wrapped["graphs"] > 0
    assert wrapped["losses"] == eager["losses"] and eager["losses"][-1] < eager["losses"][0]
    control_run, control = _run("traced")  # DeepSpeed's hooks traced: dynamo's recompile limit, every time
    assert control is None and "recompile_limit" in control_run.stderr, control_run.stderr[-3000:]
