"""LoRA's fp32 matrices cast once per step (toolkit/model/lora_cast.py) train the same bits as autocast's casts.

Tiny llama, fp32 weights, LoRA (dropout 0.1) on all 7 projections, CPU autocast to bf16, gradient
checkpointing both ways. The cast copies round the same way autocast does and backward casts the same bf16
gradients to fp32, so loss and gradients must be bit-equal, not merely close.
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from toolkit.model import sft as sft_module
from toolkit.model.lora_cast import LoraCast
from toolkit.model.sft import SupervisedFinetune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(folder, reentrant, head=False):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    llm.config.use_cache = False
    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    llm.enable_input_require_grads()
    targets = TARGETS + (["lm_head"] if head else [])
    model = get_peft_model(llm, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets))
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model.train()


def _step(model, caster=None):
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if caster is not None:
            caster.refresh(torch.bfloat16)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _Ops(TorchDispatchMode):
    """Counts ``_to_copy`` calls on fp32 LoRA weights and ``_foreach_copy_`` calls."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.casts, self.foreach = {id(w) for w in weights}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and id(args[0]) in self.weights:
            self.casts += 1
        if func is torch.ops.aten._foreach_copy_.default:
            self.foreach += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("head", [False, True], ids=["blocks", "blocks+lm_head"])
def test_cast_once_trains_the_same_bits_as_autocast(tiny_llama_dir, reentrant, head):
    plain_loss, plain_grads = _step(_peft_model(tiny_llama_dir, reentrant, head))
    model = _peft_model(tiny_llama_dir, reentrant, head)
    caster = LoraCast(model)
    blocks = model.config.num_hidden_layers
    assert [len(g) for g in caster.groups] == [2 * 7] * blocks + ([2] if head else [])
    loss, grads = _step(model, caster)
    assert loss.item() == plain_loss.item()
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * (7 * blocks + head)
    for name, grad in grads.items():
        assert torch.equal(grad, plain_grads[name]), name
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0, name


def test_one_cast_per_block_and_none_per_use(tiny_llama_dir):
    weights = lambda m: [p for n, p in m.named_parameters() if "lora_" in n]  # noqa: E731
    plain = _peft_model(tiny_llama_dir, reentrant=False)
    with _Ops(weights(plain)) as ops:
        _step(plain)
    assert ops.casts > 0 and ops.foreach == 0  # autocast casts the fp32 matrices where they are used
    model = _peft_model(tiny_llama_dir, reentrant=False)
    caster = LoraCast(model)
    with _Ops(weights(model)) as ops:
        _step(model, caster)
    groups = model.config.num_hidden_layers
    assert ops.casts == 0 and ops.foreach == 2 * groups  # forward and backward: one each per block


def test_an_optimizer_step_drops_the_copies_and_eval_uses_the_weights(tiny_llama_dir):
    model = _peft_model(tiny_llama_dir, reentrant=False)
    caster = LoraCast(model)
    _step(model, caster)
    linears = [m for g in caster.groups for m in g]
    assert all(m.cast_weight is not None and m.cast_weight.dtype == torch.bfloat16 for m in linears)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    optimizer.step()
    assert all(m.cast_weight is None for m in linears)  # stale copies are gone with the old weights
    caster.refresh(torch.bfloat16)
    x = torch.randn(3, linears[0].in_features)
    linears[0].eval()
    torch.testing.assert_close(linears[0](x), x @ linears[0].weight.T, rtol=0, atol=0)


def test_supervised_finetune_casts_once_where_its_blocks_compile(tiny_llama_dir, monkeypatch):
    """With compile on CUDA (stood in for here) SupervisedFinetune casts at each training forward and
    drops the copies for a forward outside training and for generation."""
    monkeypatch.setattr(sft_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft_module, "compile_blocks", lambda model, options=None: 0)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)
    model = SupervisedFinetune(llm, lora, gradient_checkpointing=True, compile=True).train()
    assert model.lora_cast is not None and len(model.lora_cast) == 2 * 7 * llm.config.num_hidden_layers
    linears = [m for g in model.lora_cast.groups for m in g]
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, ids.clone())["loss"].backward()
    assert all(m.cast_weight is not None for m in linears)
    with torch.no_grad():
        model.eval()(ids, ids.clone())
    assert all(m.cast_weight is None for m in linears)
    monkeypatch.setattr(sft_module.torch.cuda, "is_available", lambda: False)
    plain = SupervisedFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), lora,
                               gradient_checkpointing=True, compile=True)
    assert plain.lora_cast is None  # eager blocks: autocast's own cache already casts once per forward
