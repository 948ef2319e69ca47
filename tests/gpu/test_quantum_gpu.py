"""Circuit adapters on CUDA: bf16 base, exact start, merge, and the step-time ratio to LoRA (tools/bench_adapters.py)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_adapters", ROOT / "tools" / "bench_adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["vqc", "tq", "quanta"])
def test_bf16_base_on_cuda_starts_exact_and_trains(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.model.adapters import apply_adapter
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=1000)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 32), device="cuda")
    with torch.no_grad():
        reference = model(ids).logits
    settings = {"vqc": dict(n_qubits=3), "tq": dict(n_qubits=6), "quanta": dict(dims=[4, 8, 8])}[name]
    model = apply_adapter(model, dict(type=name, target_modules=["q_proj", "v_proj"], **settings))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.device.type == "cuda" and g.dtype == torch.float32 for g in grads)


def test_bench_runs_and_adapters_do_not_dominate(tmp_path):
    out = tmp_path / "bench.json"
    assert _bench().main(["--layers", "2", "--steps", "5", "--out", str(out)]) == 0
    methods = json.loads(out.read_text())["methods"]
    assert set(methods) == {"lora", "vqc", "vqc_expval", "tq", "quanta"}
    for name, result in methods.items():
        assert result["trainable_params"] > 0 and result["step_s"] > 0
        assert result["ratio_to_lora"] < 2.0, (name, result)
