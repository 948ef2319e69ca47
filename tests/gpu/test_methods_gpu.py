"""Each method trains on one GPU through `tk train`: QLoRA nf4 and 8-bit, LoRA bf16, full fine-tuning.

A small random llama memorises 4 random sequences: the loss must fall well below its start (a model that
does not learn cannot pass), peak memory is logged, and an adapter converts to a folder peft loads.
"""
import pytest
import torch

from gpu_helpers import losses, make_llama, needs_cuda, report, throughput, tk, tk_config, train

pytestmark = needs_cuda

# method -> (weights dtype, lr, loss ratio to reach). Seen on the CPU in fp32 after 40 iterations:
# full 7.01 -> 3.65; LoRA r=64 alpha=16 (update scaled by 1/4) 7.01 -> 5.50. The test runs 60.
METHODS = {"qlora": ("bfloat16", 3e-3, 0.8), "qlora8": ("bfloat16", 3e-3, 0.8), "lora": ("bfloat16", 3e-3, 0.8),
           "full": ("float32", 1e-3, 0.7)}
ITERS = 60


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("small_llama"))


@pytest.mark.parametrize("method", list(METHODS))
def test_method_learns_on_gpu(method, small_llama, tmp_path):
    dtype, lr, ratio = METHODS[method]
    text = tk_config(small_llama, method, seq=128, bs=2, steps=ITERS, warmup=5, vocab=1024, lr=lr,
                     dropout=0.0, distinct=4, log_interval=1, save_every=ITERS, dtype=dtype)
    result = train(tmp_path, text)
    curve = losses(tmp_path)
    stats = throughput(tmp_path)
    report(f"method/{method}", first_loss=round(curve[0], 4), last_loss=round(curve[-1], 4),
           peak_allocated_gib=stats["peak_allocated_gib"], tokens_per_s=stats["tokens_per_s_per_gpu"])
    assert len(curve) == ITERS
    assert curve[-1] < ratio * curve[0], curve
    assert "memory: " in result.stdout + result.stderr  # mmengine logs the peak memory (MB) every interval
    assert stats["peak_allocated_gib"] > 0

    if method in ("qlora", "lora"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        out = tmp_path / "adapter"
        converted = tk("convert", "pth_to_hf", tmp_path / "cfg.py", tmp_path / f"iter_{ITERS}.pth", out)
        assert converted.returncode == 0, converted.stderr[-3000:]
        assert (out / "adapter_config.json").is_file()
        base = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32)
        ids = torch.arange(3, 67).unsqueeze(0)
        with torch.no_grad():
            before = base(ids).logits
            tuned = PeftModel.from_pretrained(base, str(out))(ids).logits
        assert (tuned - before).abs().max() > 1e-3  # the trained adapter changes the model


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_lora_with_deepspeed_on_one_gpu(preset, small_llama, tmp_path):
    """One process (no torchrun): tk describes a world of one; the ZeRO checkpoint folder of an adapter
    run converts to a peft adapter."""
    text = tk_config(small_llama, "lora", seq=128, bs=2, steps=ITERS, warmup=5, vocab=1024, lr=3e-3, dropout=0.0,
                     distinct=4, log_interval=1, save_every=ITERS, dtype="bfloat16")
    train(tmp_path, text, "--deepspeed", preset)
    curve = losses(tmp_path)
    report(f"deepspeed_1gpu/{preset}/lora", first_loss=round(curve[0], 4), last_loss=round(curve[-1], 4))
    assert curve[-1] < 0.8 * curve[0], curve
    assert (tmp_path / f"iter_{ITERS}.pth").is_dir()
    out = tmp_path / "adapter"
    converted = tk("convert", "pth_to_hf", tmp_path / "cfg.py", tmp_path / f"iter_{ITERS}.pth", out)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
