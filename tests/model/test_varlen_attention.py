"""attn_implementation='tk_varlen': packed rows by document boundaries, everything else exactly as sdpa.

On a CPU the varlen kernel cannot run, so a packed row takes the fallback: sdpa with the block-diagonal
causal mask built from the boundaries, which must give the numbers of transformers' own sdpa path bit for bit
(tests/gpu/test_varlen_gpu.py checks the kernel against it on a GPU).
"""
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from toolkit.errors import UserError
from toolkit.model import varlen_attention as va
from toolkit.model.loss import causal_lm_loss
from toolkit.model.sft import SupervisedFinetune

DOCS = [5, 9, 3, 7]  # one packed row of 24 tokens


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A small random llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    folder = tmp_path_factory.mktemp("gqa_llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def _load(folder, attn):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).eval()


def _packed_row(lengths=DOCS, seed=0):
    ids = torch.randint(3, 300, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, positions


def test_packed_kwargs_are_the_document_boundaries():
    _, positions = _packed_row()
    kwargs = va.packed_attention_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 24] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"] and kwargs["max_length_q"] == kwargs["max_length_k"] == 9
    # two rows laid end to end: the second row's start is a boundary too
    rows = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert va.packed_attention_kwargs(rows)["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]


@pytest.mark.parametrize("positions, words", [
    (torch.tensor([[1, 2, 3]]), "start a document at position 0"),
    (torch.tensor([[0, 1, 3]]), "count up by one"),
    (torch.tensor([[0, 1, 1]]), "count up by one"),
])
def test_bad_position_ids_get_one_line(positions, words):
    with pytest.raises(UserError, match=words):
        va.packed_attention_kwargs(positions)


def test_block_causal_mask_sees_only_earlier_tokens_of_the_same_document():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    mask = va.block_causal_mask(cu, 1, 5)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 1, 1, 0],
                    [0, 0, 1, 1, 1]]


def test_packed_row_gives_sdpa_logits_bit_for_bit_and_each_document_alone(gqa_llama):
    ids, positions = _packed_row()
    sdpa, varlen = _load(gqa_llama, "sdpa"), _load(gqa_llama, va.NAME)
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not look for packed documents
        reference = sdpa(ids, position_ids=positions, use_cache=False).logits
        kwargs = va.packed_attention_kwargs(positions)
        with va.packed_rows():
            got = varlen(ids, position_ids=positions, use_cache=False, **kwargs).logits
        assert torch.equal(got, reference)
        # and attention stays inside each document: every document alone gives its slice of the row
        start = 0
        for n in DOCS:
            alone = sdpa(ids[:, start:start + n]).logits
            torch.testing.assert_close(got[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_packed_forward_builds_no_square_mask(monkeypatch):
    calls = []
    monkeypatch.setattr(va, "sdpa_mask", lambda *a, **k: calls.append(1))
    with va.packed_rows():
        assert va.varlen_mask(batch_size=1, q_length=4, kv_length=4) is None
    assert calls == []
    va.varlen_mask(batch_size=1, q_length=4, kv_length=4)  # outside a packed forward: sdpa's mask
    assert calls == [1]


def test_unpacked_padded_batches_and_generation_are_sdpa_exactly(gqa_llama):
    sdpa, varlen = _load(gqa_llama, "sdpa"), _load(gqa_llama, va.NAME)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        assert torch.equal(varlen(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)
        assert torch.equal(varlen(ids).logits, sdpa(ids).logits)
        prompt = ids[:1, :6]
        assert torch.equal(varlen.generate(prompt, max_new_tokens=5, do_sample=False),
                           sdpa.generate(prompt, max_new_tokens=5, do_sample=False))


def test_training_loss_and_gradients_equal_sdpa_on_packed_rows(gqa_llama):
    ids, positions = _packed_row(seed=4)
    labels = ids.clone()
    labels[:, :3] = -100

    def step(attn):
        torch.manual_seed(0)
        lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
        model = SupervisedFinetune(_load(gqa_llama, attn), lora, gradient_checkpointing=True).train()
        torch.manual_seed(1)
        loss = model(ids, labels, position_ids=positions)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (loss_s, grads_s), (loss_v, grads_v) = step("sdpa"), step(va.NAME)
    assert torch.equal(loss_v, loss_s)
    assert grads_v.keys() == grads_s.keys() and all(torch.equal(grads_v[n], grads_s[n]) for n in grads_s)


def test_causal_lm_loss_passes_boundaries_only_to_a_varlen_model(gqa_llama, monkeypatch):
    seen = []
    original = va.varlen_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("cu_seq_lens_q")))
        return original(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(va.AttentionInterface._global_mapping, va.NAME, spy)
    ids, positions = _packed_row()
    with torch.no_grad():
        causal_lm_loss(_load(gqa_llama, va.NAME), ids, ids, position_ids=positions)
    assert len(seen) == 2 and all(mask is None and cu.tolist() == [0, 5, 14, 17, 24] for mask, cu in seen)
    # an sdpa model gets no boundaries: its packed rows take transformers' own mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    sdpa_seen = []

    def sdpa_spy(module, query, key, value, attention_mask, **kwargs):
        sdpa_seen.append((attention_mask is not None, "cu_seq_lens_q" in kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(va.AttentionInterface._global_mapping, "sdpa", sdpa_spy)
    with torch.no_grad():
        causal_lm_loss(_load(gqa_llama, "sdpa"), ids, ids, position_ids=positions)
    assert sdpa_seen == [(True, False)] * 2


def test_packed_call_without_boundaries_or_with_a_window_is_refused(gqa_llama):
    """Inside a packed forward the mask function builds no mask, so a layer that dropped the boundaries, or
    a model whose attention is more than causal (a sliding window), would silently see across documents or
    past the window: one line instead."""
    llm = _load(gqa_llama, va.NAME)
    attention = llm.model.layers[0].self_attn
    q = torch.zeros(1, 4, 6, 16)
    kv = torch.zeros(1, 2, 6, 16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with va.packed_rows():
        with pytest.raises(UserError, match="does not pass keyword arguments"):
            va.varlen_attention_forward(attention, q, kv, kv, None)
        with pytest.raises(UserError, match="needs sliding_window"):
            va.varlen_attention_forward(attention, q, kv, kv, None, cu_seq_lens_q=cu, max_length_q=4,
                                        sliding_window=3)
    # outside a packed forward (generation, unpacked batches) the same call is sdpa's
    out, _ = va.varlen_attention_forward(attention, q, kv, kv, None)
    assert out.shape == (1, 6, 4, 16)


def test_checkpointed_recompute_keeps_the_document_boundaries(gqa_llama, monkeypatch):
    """Backward recomputes each checkpointed layer with the boundaries its forward had (were they lost, the
    recompute would attend across documents and the gradients would belong to another model)."""
    seen = []
    original = va.varlen_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((torch._C._current_graph_task_id() != -1, kwargs.get("cu_seq_lens_q") is not None))
        return original(module, query, key, value, attention_mask, **kwargs)
    monkeypatch.setitem(va.AttentionInterface._global_mapping, va.NAME, spy)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, target_modules=["q_proj"])
    model = SupervisedFinetune(_load(gqa_llama, va.NAME), lora, gradient_checkpointing=True).train()
    ids, positions = _packed_row()
    model(ids, ids, position_ids=positions)["loss"].backward()
    assert seen == [(False, True)] * 2 + [(True, True)] * 2


def test_kernel_refusals_name_the_reason():
    query = torch.zeros(1, 2, 4, 8)
    reason = va.kernel_refusal(query, 0.0, None)
    assert reason is not None and ("CUDA" in reason or "varlen" in reason)
    if torch.cuda.is_available():
        assert "dropout" in va.kernel_refusal(query.cuda().half(), 0.1, None)
        assert "head size" in va.kernel_refusal(torch.zeros(1, 2, 4, 264, device="cuda", dtype=torch.half), 0.0, None)
