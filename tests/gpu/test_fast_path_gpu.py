"""The fast path (compiled transformer blocks, fused AdamW) trains the same model as the plain path.

Same weights, same batch, LoRA dropout 0 (compiled dropout draws other random numbers): the loss and every
LoRA gradient of one step match the plain path's. Tolerance: bf16 compute, so fused kernels round
differently; loss within 1e-2 relative, each gradient within 3% of its norm (and cosine > 0.999).
"""
import pytest
import torch

from gpu_helpers import make_llama, needs_cuda, report

pytestmark = needs_cuda


def _one_step(folder, quantized: bool, compile: bool, dropout: float = 0.0):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from toolkit.model.loader import load_causal_lm
    from toolkit.model.sft import SupervisedFinetune
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if quantized else None
    llm = load_causal_lm(folder, dtype="bfloat16", quantization_config=quant, attn_implementation="sdpa")
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # train(): from_pretrained leaves the model in eval mode, where neither checkpointing nor dropout runs
    model = SupervisedFinetune(llm, lora, gradient_checkpointing=True, compile=compile).cuda().train()
    torch.manual_seed(2)
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    ids = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    labels = ids.clone()
    labels[:, :32] = -100
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels)["loss"]
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("quantized", [False, True], ids=["lora_bf16", "qlora_nf4"])
def test_compiled_blocks_give_the_plain_loss_and_gradients(tmp_path, quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    folder = make_llama(tmp_path / "llama", torch.bfloat16)
    plain_loss, plain = _one_step(folder, quantized, compile=False)
    fast_loss, fast = _one_step(folder, quantized, compile=True)
    assert plain.keys() == fast.keys() and len(plain) == 4 * 7 * 2
    worst = max((fast[n] - plain[n]).norm().item() / plain[n].norm().item() for n in plain)
    cosine = min(torch.nn.functional.cosine_similarity(fast[n].flatten(), plain[n].flatten(), dim=0).item()
                 for n in plain)
    report(f"fast_path/{'qlora' if quantized else 'lora'}", plain_loss=plain_loss, fast_loss=fast_loss,
           worst_grad_rel_diff=round(worst, 5), min_cosine=round(cosine, 6))
    assert abs(fast_loss - plain_loss) <= 1e-2 * abs(plain_loss)
    assert worst < 0.03 and cosine > 0.999


@pytest.mark.parametrize("quantized", [False, True], ids=["lora_bf16", "qlora_nf4"])
def test_compiled_reentrant_checkpoint_recomputes_the_forward_dropout_masks(tmp_path, monkeypatch, quantized):
    """Compiled blocks with reentrant checkpointing (tk's choice for compiled LoRA on transformers 5.17, and
    peft's default for QLoRA) run the block's inference graph first and its training graph in backward's
    recompute. With LoRA dropout 0.1 and the same seed, that step must give the loss and gradients of the
    non-reentrant kind, whose recompute is the graph its forward ran; if the two graphs drew different masks,
    the gradients would belong to another dropout sample than the loss."""
    from toolkit.model import sft as sft_module
    if quantized:
        pytest.importorskip("bitsandbytes")
    elif not sft_module.reentrant_checkpointing(True, None, False):
        pytest.skip("this transformers checkpoints inside the compiled block, where tk's compiled LoRA is "
                    "non-reentrant already: nothing to compare")
    folder = make_llama(tmp_path / "llama", torch.bfloat16)
    reentrant_loss, reentrant = _one_step(folder, quantized, compile=True, dropout=0.1)
    monkeypatch.setattr(sft_module, "reentrant_checkpointing", lambda *args: False)
    if quantized:
        import peft
        original = peft.prepare_model_for_kbit_training

        def non_reentrant(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None):
            return original(model, use_gradient_checkpointing, {"use_reentrant": False})
        monkeypatch.setattr(peft, "prepare_model_for_kbit_training", non_reentrant)
    torch._dynamo.reset()
    plain_loss, plain = _one_step(folder, quantized, compile=True, dropout=0.1)
    worst = max((reentrant[n] - plain[n]).norm().item() / plain[n].norm().item() for n in plain)
    report(f"fast_path/reentrant_dropout/{'qlora' if quantized else 'lora'}", reentrant_loss=reentrant_loss,
           non_reentrant_loss=plain_loss, worst_grad_rel_diff=round(worst, 5))
    assert abs(reentrant_loss - plain_loss) <= 1e-3 * abs(plain_loss)
    assert worst < 0.03
