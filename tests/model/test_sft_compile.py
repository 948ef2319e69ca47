"""``compile=True`` on a machine without CUDA: the blocks run eagerly, say so, and train the same numbers."""
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
    for compile in (False, True):  # compile=True also switches checkpointing to the reentrant kind
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
