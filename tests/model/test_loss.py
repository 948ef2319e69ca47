"""The LM head on trained positions only gives the model's own loss and gradients."""
import torch
from transformers import AutoModelForCausalLM

from toolkit.model.loss import causal_lm_loss


def test_selective_head_equals_full_forward(tiny_llama_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    input_ids = torch.randint(3, 1000, (2, 24))
    labels = input_ids.clone()
    labels[0, :10] = -100
    labels[1, :5] = -100
    labels[1, 20:] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 20:] = 0

    ours = causal_lm_loss(model, input_ids, labels, attention_mask)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    reference.backward()
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
