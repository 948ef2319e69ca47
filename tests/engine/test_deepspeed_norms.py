"""ZeRO's gradient norm in fp32 (toolkit/engine/deepspeed_norms.py): the same clipping as fp64, in fp32.

One CPU process (gloo), a 2-layer llama in fp32, ZeRO-2 and ZeRO-3 (ZeRO-1 runs ZeRO-2's optimizer class),
clipping at 0.01 (so the clip factor scales every gradient): DeepSpeed's norm code asks for fp32, its global
norm equals torch's fp64 norm of the same gradients within 1e-6, and the clipped step leaves the weights that
torch's ``clip_grad_norm_`` + SGD leave on the plain model. Under ZeRO-3 the norm is an fp32 tensor, and the
control (``TK_ZERO_NORM=fp64``) asks for and gets DeepSpeed's fp64.
"""
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_process import run_one_process  # noqa: E402

SCRIPT = textwrap.dedent('''
    import copy, json, sys
    import torch
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolkit.engine.deepspeed_norms import norms_in_fp32
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    stage = int(sys.argv[1])
    patched = norms_in_fp32()
    zero = stage3 if stage == 3 else stage_1_and_2
    asked, chosen = [], zero.get_norm_dtype  # count what DeepSpeed's norm code asks, and get, in this stage

    def spy():
        asked.append(str(chosen()))
        return chosen()
    zero.get_norm_dtype = spy
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=256, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.01,
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=ds)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    norm = engine.optimizer._global_grad_norm
    optimizer = torch.optim.SGD(plain.parameters(), lr=1.0)
    plain(input_ids=ids, labels=ids).loss.backward()
    reference = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in plain.parameters()]))
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.01)
    optimizer.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
    print("RESULT " + json.dumps({"patched": patched, "dtype": str(getattr(norm, "dtype", None)),
                                  "norm": float(norm), "reference": float(reference), "weights": worst,
                                  "asked": sorted(set(asked)), "calls": len(asked)}))
''')


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_takes_the_gradient_norm_in_fp32_with_the_same_clipping(stage):
    done, got = run_one_process(SCRIPT, stage)
    assert got is not None, done.stderr[-3000:]
    assert got["patched"] and got["asked"] == ["torch.float32"] and got["calls"] > 0, got
    assert got["norm"] == pytest.approx(got["reference"], rel=1e-6) and got["reference"] > 1.0, got
    assert got["weights"] < 1e-8, got  # the same clipped SGD step (lr 1: the step is the clipped gradient, norm 0.01)
    if stage == 2:
        return
    assert got["dtype"] == "torch.float32", got
    done, control = run_one_process(SCRIPT, stage, TK_ZERO_NORM="fp64")
    assert control is not None, done.stderr[-3000:]
    assert not control["patched"] and control["asked"] == ["torch.float64"] and control["calls"] > 0, control
    assert control["norm"] == pytest.approx(got["reference"], rel=1e-6) and control["dtype"] == "torch.float64"
