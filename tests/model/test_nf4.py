"""bitsandbytes 4-bit linears as torch ops (toolkit/model/nf4.py): the same weights bit for bit, the same
outputs and input gradients, and one compiled graph (no break) for every layer of a shape."""
import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from toolkit.model.nf4 import dequantize, use_torch_4bit  # noqa: E402


def _linear4bit(out_features, in_features, quant_type="nf4", nested=True, bias=False, seed=0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.bfloat16,
                              quant_type=quant_type, compress_statistics=nested)
    weight = torch.randn(out_features, in_features) * 0.05
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                     compress_statistics=nested)
    if bias:
        layer.bias = nn.Parameter(torch.randn(out_features) * 0.1)
    return layer.to("cpu")  # quantizes


# 130 x 131: 267 scales, so the 8-bit scales span two 256-blocks, the second one short; 33 x 50: a last
# 4-bit block of 50 values
@pytest.mark.parametrize("shape", [(130, 131), (33, 50), (64, 128)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "fp32_scales"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape, quant_type, nested, dtype):
    layer = _linear4bit(*shape, quant_type=quant_type, nested=nested)
    use_torch_4bit(layer)
    state = layer.weight.quant_state
    expected = bnb.functional.dequantize_4bit(layer.weight.data, state).to(dtype)
    got = dequantize(layer.nf4_packed, layer.nf4_code, layer.nf4_absmax,
                     layer.nf4_absmax2 if nested else None, layer.nf4_absmax2_code if nested else None,
                     layer.nf4_offset if nested else None, layer.nf4_shape, layer.nf4_blocksize,
                     layer.nf4_blocksize2, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_patched_layer_gives_the_bitsandbytes_output_and_input_gradient(bias):
    layer = _linear4bit(96, 128, bias=bias)
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2, 5, 96, dtype=torch.bfloat16)
    ref = layer(x)
    ref.backward(grad_out)
    ref_grad, x.grad = x.grad, None
    ref_bias_grad = layer.bias.grad.clone() if bias else None
    if bias:
        layer.bias.grad = None
    assert use_torch_4bit(layer) == 1
    out = layer(x)
    out.backward(grad_out)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref_bias_grad, rtol=1e-2, atol=1e-2)


def test_fp32_input_comes_back_fp32_computed_in_the_compute_dtype():
    layer = _linear4bit(32, 64)
    x = torch.randn(3, 64)
    ref = layer(x)
    use_torch_4bit(layer)
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_weight_is_not_kept_dequantized_for_backward():
    """Only the packed codes and scales are saved (what keeps QLoRA's memory that of 4-bit weights)."""
    layer = _linear4bit(96, 128)
    use_torch_4bit(layer)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)).sum().backward()
    assert saved and all(t.dtype in (torch.uint8, torch.float32) for t in saved)
    assert not any(t.shape == (96, 128) for t in saved)


class _Block(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.up, self.down = _linear4bit(128, 64, seed=seed), _linear4bit(64, 128, seed=seed + 1)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.up(x)))


def test_every_layer_shares_one_compiled_graph_without_breaks():
    """What compile_blocks relies on: traced as torch ops, with the 4-bit state as graph inputs, not
    constants baked into a graph per layer (aot_eager: dynamo + autograd tracing, no codegen)."""
    from peft import LoraConfig, get_peft_model
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_Block(seed) for seed in (0, 10, 20))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = get_peft_model(Model(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    # as under gradient checkpointing (enable_input_require_grads): every block's input requires grad, so
    # every block sees the same guards
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    eager = model(x)
    eager.float().square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    assert use_torch_4bit(model) == 6
    blocks = [m for m in model.modules() if isinstance(m, _Block)]
    for block in blocks:
        block.compile(backend=backend, fullgraph=True)
    out = model(x)
    out.float().square().sum().backward()
    assert len(graphs) == 1  # three layers, one graph
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5)
    torch._dynamo.reset()


def test_other_modules_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), _linear4bit(8, 4))
    assert use_torch_4bit(model) == 1
    assert use_torch_4bit(model) == 0  # already routed
    assert not hasattr(model[0], "nf4_shape")
