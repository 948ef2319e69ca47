"""tk's torch-op 4-bit linear on CUDA (toolkit/model/nf4.py): eagerly, the weights bitsandbytes' CUDA kernel
dequantizes, bit for bit; compiled (the kernel Inductor generates), the layer's output and input gradient
within bf16 rounding of bitsandbytes' own layer, keeping at most that layer's bf16 weight for backward."""
import pytest
import torch

from gpu_helpers import needs_cuda, report

pytestmark = needs_cuda
bnb = pytest.importorskip("bitsandbytes")


def _layer(out_features=4096, in_features=11008):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.02, requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    return layer.cuda()


def test_cuda_dequantize_is_bitsandbytes_bit_for_bit():
    from toolkit.model.nf4 import dequantize, use_torch_4bit
    layer = _layer()
    use_torch_4bit(layer)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    got = dequantize(layer.nf4_packed, layer.nf4_code, layer.nf4_absmax, layer.nf4_absmax2, layer.nf4_absmax2_code,
                     layer.nf4_offset, layer.nf4_shape, layer.nf4_blocksize, layer.nf4_blocksize2, torch.bfloat16)
    assert torch.equal(got, expected)


def test_compiled_layer_matches_bitsandbytes():
    from toolkit.model.nf4 import use_torch_4bit
    layer = _layer()
    x = torch.randn(2, 512, 11008, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16)
    ref = layer(x)
    ref.backward(grad_out)
    ref_grad, x.grad = x.grad, None
    use_torch_4bit(layer)
    compiled = torch.compile(layer)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = compiled(x)
    held = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    out.backward(grad_out)
    out_diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    grad_diff = ((x.grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()).item()
    report("nf4/compiled_layer", out_rel_diff=out_diff, grad_rel_diff=grad_diff, held_mib=round(held / 2**20, 1))
    assert out_diff < 1e-3 and grad_diff < 1e-3
    # Inductor keeps at most the one bf16 weight (86 MiB) for backward, never an fp32 copy or more
    assert held <= 4096 * 11008 * 2 + 2**20
