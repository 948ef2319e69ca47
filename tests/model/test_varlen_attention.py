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


@torch.library.custom_op("tk_test::varlen_stand_in", mutates_args={})
def _varlen_stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int) -> torch.Tensor:
    """Shaped like torch's varlen kernel (a custom op taking the longest document as ints); computes a copy."""
    return q.clone()


@_varlen_stand_in.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


_varlen_stand_in.register_autograd(lambda ctx, grad: (grad, torch.zeros_like(grad), torch.zeros_like(grad),
                                                      None, None, None, None))


@pytest.mark.parametrize("path", ["fallback", "kernel"])
def test_compiled_blocks_trace_packed_rows_whole_for_any_row_length(gqa_llama, monkeypatch, path):
    """Compiled decoder layers on packed rows of twelve lengths and document counts: no graph break (reading the
    packed flag was one at every attention call, when it was a ContextVar), and the second six rows compile
    nothing new (best-fit rows, a new length each step, hit dynamo's recompile limit on an H100). The kernel
    path (a custom op shaped like torch's varlen kernel stands in: CPU has none) compiles two graphs, static
    then dynamic; the CPU fallback's mask code adds a few size specializations (one document, several)."""
    import torch._dynamo
    from toolkit.model.blocks import transformer_blocks
    if path == "kernel":
        monkeypatch.setattr(va, "kernel_refusal", lambda *args: None)
        monkeypatch.setattr(va, "_VARLEN_PARAMS", {"scale": None, "is_causal": None})
        monkeypatch.setattr(va, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k, scale=None, is_causal=True:
                            _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    graphs = [0]

    def counting(graph, inputs):
        graphs[0] += 1
        return graph.forward
    model = _load(gqa_llama, va.NAME).train()
    for block in transformer_blocks(model):
        block.compile(backend=counting)
    rows = [[DOCS, [11, 2, 30], [40], [3, 3, 3, 3, 3, 20], [17, 16], [8, 9, 10, 11, 12]],
            [[50], [6, 1, 25], [2, 2, 2, 2, 2, 2, 2, 2], [33, 14], [19, 5, 7, 1], [60, 3]]]
    seen = []
    try:
        for group in rows:
            for seed, lengths in enumerate(group):
                ids, positions = _packed_row(lengths, seed)
                causal_lm_loss(model, ids, ids, position_ids=positions).backward()
            seen.append(graphs[0])
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert breaks == {}, breaks
    assert seen[1] == seen[0] == 2 if path == "kernel" else seen[1] == seen[0] <= 4, seen
