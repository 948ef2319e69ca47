"""Circuit adapters under DeepSpeed ZeRO-3 train like under ZeRO-2, with one bank build a forward.

ZeRO-3 partitions every parameter outside its module's forward; the circuits' bank builds all unitaries in
a pre-hook of the decoder, outside the layers that own θ (or quanta's gates), where it used to read empty
partitions and crash (an IndexError in the simulator). The bank now gathers them for the build. One CPU
process (gloo), a 2-layer llama in fp32, q_proj and v_proj adapted, AdamW, four steps with every parameter
partitioned (persistence threshold 0) and with the shipped preset's threshold, after a forward of the
LM inside the engine's module, outside the engine (what EvaluateChatHook's generate before training does,
where `tk train` crashed): its logits and the losses equal ZeRO-2's
(same data, same init; only float summation order may differ), they fall, and every adapted layer takes its
unitary from the bank (no layer builds its own). quanta banks its fused node's gate matrices, a CUDA default
that ``TK_QUANTA_FUSED=1`` turns on here."""
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_process import run_one_process  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from toolkit.model.adapters.quantum import bank
    from toolkit.model.adapters.quantum.inject import inject
    kind, stage, threshold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = {"vqc": dict(n_qubits=3, n_layers=2), "tq": dict(n_qubits=4, n_layers=2),
                "quanta": dict(dims=[4, 4, 4])}[kind]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=256, use_cache=False))
    inject(model, kind, target_modules=("q_proj", "v_proj"), **settings)
    hits = {"bank": 0, "own": 0}
    real = bank.bank_unitary

    def counting(delta):
        got = real(delta)
        hits["bank" if got is not None else "own"] += 1
        return got

    for module in ("vqc", "tq", "quanta"):
        setattr(sys.modules[f"toolkit.model.adapters.quantum.{module}"], "bank_unitary", counting)
    ds = json.load(open("configs/deepspeed/zero3.json"))
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
              bf16={"enabled": False}, fp16={"enabled": False})
    ds["zero_optimization"]["stage"] = stage
    # the preset's "auto" fields as tk's strategy fills them for circuit adapters (never fetched whole), in fp32
    ds.update(communication_data_type="fp32")
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 50_000_000
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    class Wrapper(torch.nn.Module):  # the model inside tk's SupervisedFinetune, as DeepSpeed's engine holds it
        def __init__(self, llm):
            super().__init__()
            self.llm = llm

        def forward(self, **batch):
            return self.llm(**batch)

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=Wrapper(model), optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                      config=ds)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # EvaluateChatHook's generate before training: the LM alone, outside the engine
        first = engine.module.llm(input_ids=ids).logits[0, -1].tolist()
    losses = []
    for _ in range(4):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print("RESULT", json.dumps(dict(losses=losses, hits=hits, first=first)))
''')


def _run(kind, stage, threshold=0):
    done, result = run_one_process(SCRIPT, kind, stage, threshold, TK_QUANTA_FUSED="1")
    assert result is not None, done.stderr[-3000:]
    return result


@pytest.mark.parametrize("kind", ["vqc", "tq", "quanta"])
def test_circuit_adapter_trains_under_zero3_like_zero2(kind):
    zero2 = _run(kind, 2)
    assert zero2["losses"][-1] < zero2["losses"][0]
    for threshold in (0, 100000):  # every parameter partitioned; the shipped preset (small ones persist)
        zero3 = _run(kind, 3, threshold)
        assert zero3["losses"] == pytest.approx(zero2["losses"], rel=1e-5), (threshold, zero3, zero2)
        assert zero3["first"] == pytest.approx(zero2["first"], rel=1e-5, abs=1e-5)
        assert zero3["hits"]["own"] == 0 and zero3["hits"]["bank"] == zero2["hits"]["bank"] > 0, zero3
