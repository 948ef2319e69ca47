"""attn_implementation='tk_varlen' on a GPU: packed rows through flash attention's varlen kernel give the numbers
of sdpa's block-diagonal mask.

Small random llama with grouped-query attention (4 query, 2 key/value heads, head size 64), bf16, one packed row
of four documents (2,048 tokens). Tolerances (bf16 compute, different kernels): logits within 2e-2 absolute of
sdpa's and of each document run alone; one LoRA training step (dropout 0.1, checkpointing): loss within 1e-2
relative, every LoRA gradient within 3% of its norm and cosine > 0.999, as the fast-path guard.
"""
import pytest
import torch

from gpu_helpers import make_llama, needs_cuda, report

pytestmark = needs_cuda

DOCS = [300, 700, 50, 998]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("varlen") / "llama", torch.bfloat16, num_attention_heads=4,
                      num_key_value_heads=2)


@pytest.fixture
def kernel_calls(monkeypatch):
    from toolkit.model import varlen_attention as va
    if va.varlen_attn is None:
        pytest.fail("this torch has no torch.nn.attention.varlen: tk_varlen falls back to sdpa everywhere")
    calls = []

    def counted(*args, **kwargs):
        # (max_q, whether autograd's engine is running: backward's recompute of a checkpointed layer)
        calls.append((args[5], torch._C._current_graph_task_id() != -1))
        return real(*args, **kwargs)
    real = va.varlen_attn
    monkeypatch.setattr(va, "varlen_attn", counted)
    return calls


def _row(lengths=DOCS, seed=0):
    ids = torch.randint(3, 1024, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed)).cuda()
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    return ids, positions


def _load(folder, attn):
    from toolkit.model.loader import load_causal_lm
    return load_causal_lm(folder, dtype="bfloat16", attn_implementation=attn).cuda()


def test_varlen_kernel_gives_the_masked_sdpa_logits(llama, kernel_calls):
    from toolkit.model import varlen_attention as va
    ids, positions = _row()
    sdpa, varlen = _load(llama, "sdpa").eval(), _load(llama, va.NAME).eval()
    with torch.no_grad():
        reference = sdpa(ids, position_ids=positions, use_cache=False).logits.float()
        with va.packed_rows():
            got = varlen(ids, position_ids=positions, use_cache=False,
                         **va.packed_attention_kwargs(positions)).logits.float()
        worst_alone, start = 0.0, 0
        for n in DOCS:
            alone = sdpa(ids[:, start:start + n], use_cache=False).logits.float()
            worst_alone = max(worst_alone, (got[:, start:start + n] - alone).abs().max().item())
            start += n
    worst = (got - reference).abs().max().item()
    report("varlen/logits", worst_vs_masked_sdpa=worst, worst_vs_each_document_alone=worst_alone,
           kernel_calls=kernel_calls)
    assert kernel_calls == [(max(DOCS), False)] * 4  # one call a layer, the longest document's length
    assert worst < 2e-2 and worst_alone < 2e-2


def _train_step(folder, attn, compile=False, rows=((DOCS, 0),), dropout=0.1):
    from peft import LoraConfig

    from toolkit.model.sft import SupervisedFinetune
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = SupervisedFinetune(_load(folder, attn), lora, gradient_checkpointing=True, compile=compile).cuda().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator("cuda").manual_seed(hash(name) % 2**31))
    losses = []
    for lengths, seed in rows:
        ids, positions = _row(lengths, seed)
        labels = ids.clone()
        labels[:, :16] = -100
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels, position_ids=positions)["loss"]
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _compare(name, a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4 * 7 * 2
    worst = max((grads_b[n] - grads_a[n]).norm().item() / grads_a[n].norm().item() for n in grads_a)
    cosine = min(torch.nn.functional.cosine_similarity(grads_a[n].flatten(), grads_b[n].flatten(), dim=0).item()
                 for n in grads_a)
    report(name, losses_a=loss_a, losses_b=loss_b, worst_grad_rel_diff=round(worst, 5), min_cosine=round(cosine, 6))
    assert all(abs(x - y) <= 1e-2 * abs(x) for x, y in zip(loss_a, loss_b))
    assert worst < 0.03 and cosine > 0.999


def test_training_step_matches_sdpa(llama, monkeypatch):
    """One LoRA step with checkpointing: forward and backward's recompute of each layer both take the kernel
    (the attention function records whether it refuses, and whether autograd's engine is running), and the
    loss and gradients are sdpa's."""
    from toolkit.model import varlen_attention as va
    sdpa = _train_step(llama, "sdpa")
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        refusal = va.kernel_refusal(query, kwargs.get("dropout", 0.0), kwargs.get("scaling"))
        seen.append((torch._C._current_graph_task_id() != -1, kwargs.get("cu_seq_lens_q") is not None, refusal))
        return va.varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(va.AttentionInterface._global_mapping, va.NAME, spy)
    varlen = _train_step(llama, va.NAME)
    report("varlen/train_step_attention_calls", calls=seen)
    _compare("varlen/train_step", sdpa, varlen)
    assert seen == [(False, True, None)] * 4 + [(True, True, None)] * 4


def test_compiled_blocks_take_packed_rows_of_changing_layouts(llama):
    """Rows of other lengths and document counts one after the other: compiled blocks with the varlen kernel
    give the eager losses. (Five layouts stay under dynamo's recompile limit; an epoch of best-fit rows of 38
    lengths did not, docs/benchmarks.md.) LoRA dropout 0: compiled dropout draws other random numbers. No spy
    on the kernel here: a Python wrapper would change what dynamo traces."""
    from toolkit.model import varlen_attention as va
    assert va.varlen_attn is not None
    rows = (([300, 700, 50, 998], 0), ([1000, 24, 500], 1), ([64] * 20, 2), ([2000], 3), ([77, 1500, 371], 4))
    eager = _train_step(llama, va.NAME, rows=rows, dropout=0.0)
    compiled = _train_step(llama, va.NAME, compile=True, rows=rows, dropout=0.0)
    _compare("varlen/compiled_rows", eager, compiled)
