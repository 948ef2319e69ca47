"""checkpoint_every=k: only blocks 0, k, 2k, ... recompute their forward in backward, and training computes the
same numbers as checkpointing every block.

A 4-layer version of the tiny llama, fp32 on a CPU, one forward + backward. The attention kernel is counted at
dispatch (once per block in forward, once more per checkpointed block in backward). Tolerance: none: the blocks
run the same kernels on the same inputs either way, and checkpoint restores the RNG state for its recompute, so
loss and gradients are bit-equal, LoRA dropout 0.1 included.
"""
import pytest
import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM

from toolkit.errors import UserError
from toolkit.model.sft import SupervisedFinetune
from test_selective_checkpoint import TARGETS, _CountAttention

LAYERS = 4


def _model(folder, adapter=True, **options):
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = LAYERS
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS,
                init_lora_weights=False) if adapter else None
    return SupervisedFinetune(llm, lora, **options).train()


def _step(model):
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100
    torch.manual_seed(5)
    counter = _CountAttention()
    with counter:
        loss = model(ids, labels)["loss"]
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.count


@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("every,checkpointed", [(2, [0, 2]), (3, [0, 3]), (4, [0]), (5, [0])])
def test_only_every_kth_block_recomputes_and_the_numbers_stay(tiny_llama_dir, adapter, every, checkpointed):
    reference = _step(_model(tiny_llama_dir, adapter, gradient_checkpointing=True))
    model = _model(tiny_llama_dir, adapter, gradient_checkpointing=True, checkpoint_every=every)
    layers = (model.llm.base_model.model if adapter else model.llm).model.layers
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == checkpointed
    ours = _step(model)
    assert reference[2] == 2 * LAYERS
    assert ours[2] == LAYERS + len(checkpointed)
    assert torch.equal(ours[0], reference[0])
    assert ours[1].keys() == reference[1].keys() and len(ours[1]) > 0
    for name, grad in reference[1].items():
        assert torch.equal(ours[1][name], grad), name
    assert all(g.abs().sum() > 0 for g in ours[1].values())


def test_every_1_is_full_checkpointing(tiny_llama_dir):
    model = _model(tiny_llama_dir, gradient_checkpointing=True, checkpoint_every=1)
    assert _step(model)[2] == 2 * LAYERS


@pytest.mark.parametrize("every", [0, -2, 1.5, True, "2"])
def test_a_bad_value_is_one_clear_line(tiny_llama_dir, every):
    with pytest.raises(UserError, match=r"model.checkpoint_every = .* must be a whole number >= 1"):
        _model(tiny_llama_dir, gradient_checkpointing=True, checkpoint_every=every)


def test_without_gradient_checkpointing_it_says_so(tiny_llama_dir):
    with pytest.raises(UserError, match=r"checkpoint_every=2 .* set model.gradient_checkpointing=True"):
        _model(tiny_llama_dir, checkpoint_every=2)


def test_composes_with_recompute_attention_false(tiny_llama_dir):
    """Only the checkpointed blocks (0 and 2) take tk's selective checkpoint; nothing recomputes attention."""
    reference = _step(_model(tiny_llama_dir, gradient_checkpointing=True))
    model = _model(tiny_llama_dir, gradient_checkpointing=True, checkpoint_every=2, recompute_attention=False)
    layers = model.llm.base_model.model.model.layers
    selective = [i for i, layer in enumerate(layers) if "_forward_saving_attention" in repr(layer.forward)]
    assert selective == [0, 2]
    ours = _step(model)
    assert ours[2] == LAYERS
    assert torch.equal(ours[0], reference[0])
    for name, grad in reference[1].items():
        assert torch.equal(ours[1][name], grad), name


def test_blocks_are_counted_within_each_stack():
    """Two stacks (a vision tower's 3 layers before a language model's 4): each keeps blocks 0, 2, ... of its own."""
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    from toolkit.model.blocks import checkpoint_every_kth_block

    class Layer(GradientCheckpointingLayer):
        gradient_checkpointing = True

    model = nn.Module()
    model.vision = nn.ModuleList(Layer() for _ in range(3))
    model.language = nn.ModuleList(Layer() for _ in range(4))
    assert checkpoint_every_kth_block(model, 2) == (4, 7)
    assert [layer.gradient_checkpointing for layer in model.vision] == [True, False, True]
    assert [layer.gradient_checkpointing for layer in model.language] == [True, False, True, False]


def test_checkpoint_moved_inside_forward_recomputes_every_block_with_the_same_numbers(tiny_llama_dir):
    """checkpoint_inside_forward (the arrangement a compiled block can trace): each block still recomputes once
    in backward, and loss and gradients equal HF's checkpoint around the call, LoRA dropout 0.1 included."""
    from toolkit.model.selective_checkpoint import checkpoint_inside_forward
    reference = _step(_model(tiny_llama_dir, gradient_checkpointing=True))
    model = _model(tiny_llama_dir, gradient_checkpointing=True)
    assert checkpoint_inside_forward(model.llm) == LAYERS
    layers = model.llm.base_model.model.model.layers
    assert not any(layer.gradient_checkpointing for layer in layers)  # HF's own checkpoint is off
    ours = _step(model)
    assert ours[2] == 2 * LAYERS
    assert torch.equal(ours[0], reference[0])
    assert ours[1].keys() == reference[1].keys()
    assert all(torch.equal(ours[1][name], grad) for name, grad in reference[1].items())
