"""Long-context switches (chunked LM head, offloaded checkpoints, tiled MLP) train the same numbers.

On the tiny llama with LoRA on all 7 projections, fp32, one forward + backward. Tolerances: the chunked loss
sums fp32 cross-entropy chunk by chunk, so loss within 1e-6 relative and gradients within 1e-5; offloading
moves tensors without touching them, so its loss and gradients are bit-equal; a tiled MLP runs smaller
matmuls (other summation blocking), so 1e-5 with dropout 0. With LoRA dropout > 0 a tiled MLP draws its
masks chunk by chunk (a different, equally valid sample than the untiled draw), so there the check is that
backward's recompute reproduces the masks its own forward drew: gradients equal those of the same chunked
forward without recompute.
"""
import re

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from toolkit.cli.main import main
from toolkit.errors import UserError
from toolkit.model import tiled_mlp as tiled_mlp_module
from toolkit.model.loss import causal_lm_loss, head_cross_entropy
from toolkit.model.sft import SupervisedFinetune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 40


def _model(folder, dropout=0.1, **options):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = dict(type=LoraConfig, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    model = SupervisedFinetune(llm, lora, gradient_checkpointing=True, **options).train()
    with torch.no_grad():  # LoRA B starts at zero, which would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def _batch():
    ids = torch.randint(3, 1000, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = -100  # ragged: row 0 trains its tail, row 1 two separate spans
    labels[1, :4] = -100
    labels[1, 20:27] = -100
    return ids, labels


def _step(model, seed=5):
    ids, labels = _batch()
    torch.manual_seed(seed)
    loss = model(ids, labels)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol, atol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)
    assert all(g.abs().sum() > 0 for g in grads_a.values())


# ---- chunked LM head + cross-entropy ---------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 99, 100])
def test_chunked_head_cross_entropy_equals_unchunked(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(100, 16, requires_grad=True)
    targets = torch.randint(0, 50, (100,))
    results = []
    for chunk_tokens in (None, chunk):
        head.zero_grad()
        hidden.grad = None
        loss = head_cross_entropy(head, hidden, targets, chunk_tokens)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (ref, ref_h, ref_w), (ours, h, w) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-7)


def test_chunked_loss_on_ragged_labels_equals_the_models_own_loss(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids, labels = _batch()
    results = []
    for chunk_tokens in ("model", 5):
        model.zero_grad()
        loss = (model(input_ids=ids, labels=labels).loss if chunk_tokens == "model"
                else causal_lm_loss(model, ids, labels, chunk_tokens=chunk_tokens))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (ours, grads) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for name in ref_grads:  # fp32 sums in another order: on one CPU the embedding gradient (up to 0.08) came out
        # 6.3e-7 apart at most; a wrong mask moves it by orders of magnitude more
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_with_dropout_in_the_head_gives_the_unchunked_gradients(tiny_llama_dir):
    """LoRA on lm_head with dropout: each chunk's recompute must draw the forward's dropout mask."""
    from peft import get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "lm_head"],
                                      init_lora_weights=False)).train()
    ids, labels = _batch()
    results = []
    for chunk_tokens in (None, 5):
        model.zero_grad()
        torch.manual_seed(5)
        loss = causal_lm_loss(model, ids, labels, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (ours, grads) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert any("lm_head" in name for name in ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_with_no_trained_token_is_zero_and_backpropagates(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids, _ = _batch()
    loss = causal_lm_loss(model, ids, torch.full_like(ids, -100), chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())  # the head too


def test_the_logits_exist_one_chunk_at_a_time(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    ids, labels = _batch()
    causal_lm_loss(model, ids, labels, chunk_tokens=16).backward()
    trained = int((labels[:, 1:] != -100).sum())
    forward = [16] * (trained // 16) + [trained % 16] * bool(trained % 16)
    assert rows == forward + forward[::-1]  # forward, then backward's recompute, last chunk first


# ---- offloaded checkpoints -------------------------------------------------------------------------------
def test_offload_keeps_exactly_the_block_inputs_in_host_copies(tiny_llama_dir):
    reference = _step(_model(tiny_llama_dir))
    model = _model(tiny_llama_dir, offload_activations=True)
    offloader = model.activation_offloader
    layers = model.llm.base_model.model.model.layers
    inputs, packed = [], []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    pack = offloader.pack

    def spy(tensor):
        item = pack(tensor)
        packed.append((tensor, item))
        return item
    offloader.pack = spy
    assert _step(model)[0] == reference[0]
    _assert_same(_step_again(model), reference, rtol=0, atol=0)
    # one host copy per decoder layer and step (2 steps), nothing from inside the layers
    real = [(t, item) for t, item in packed if t.numel()]
    assert len(real) == 2 * len(layers)
    hidden = model.llm.config.hidden_size
    assert offloader.packed_bytes == 2 * len(layers) * 2 * SEQ * hidden * 4
    for tensor, item in real:
        assert item.host.device.type == "cpu" and item.host.data_ptr() != tensor.data_ptr()
        assert any(torch.equal(item.host, x) for x in inputs)  # a block's input, copied
        assert item.device_copy is None  # nothing left on the device after backward
    assert not torch.equal(real[0][1].host, real[1][1].host)


def test_offload_leaves_no_block_input_on_the_device_until_backward(tiny_llama_dir):
    """Every tensor offload copied to the host is freed on the device once forward returns, the first
    block's input too: that one is the embeddings' output, which the hook making it require grad (only
    reentrant checkpointing needs that) turned into a leaf whose gradient accumulator kept it alive. At
    256k tokens on a 7B model that was 2-4 GiB of GPU memory kept for nothing."""
    import gc
    import weakref
    model = _model(tiny_llama_dir, offload_activations=True)
    offloader, alive = model.activation_offloader, []
    pack = offloader.pack

    def spy(tensor):
        if tensor.numel():
            alive.append(weakref.ref(tensor))
        return pack(tensor)
    offloader.pack = spy
    ids, labels = _batch()
    loss = model(ids, labels)["loss"]
    gc.collect()
    assert len(alive) == len(model.llm.base_model.model.model.layers)
    assert [ref() is None for ref in alive] == [True] * len(alive)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("options", [dict(), dict(dropout=0.0, tiled_mlp=8)], ids=["offload", "offload+tiled_mlp"])
def test_offload_keeps_a_compiled_block_whole(tiny_llama_dir, options):
    """Blocks compiled before the offload is set up (as SupervisedFinetune orders it) trace without a graph
    break, whichever side of the compiled call this transformers version checkpoints on, and train the
    eager numbers (aot_eager: dynamo and AOTAutograd without Inductor, so it runs on a CPU)."""
    from torch._dynamo.utils import counters

    from toolkit.model.offload import ActivationOffloader, offload_checkpointed_inputs
    reference = _step(_model(tiny_llama_dir, dropout=options.get("dropout", 0.1)))
    torch._dynamo.reset()
    counters.clear()
    model = _model(tiny_llama_dir, **options)
    layers = model.llm.base_model.model.model.layers
    for layer in layers:
        layer.compile(backend="aot_eager")
    offloader = ActivationOffloader()
    assert offload_checkpointed_inputs(model.llm, offloader) == len(layers)
    _assert_same(_step(model), reference, rtol=1e-5, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert offloader.packed_count == len(layers)


@pytest.mark.parametrize("moves", [True, False], ids=["offloads", "moves_nothing"])
def test_offload_that_moves_nothing_says_so_once(tiny_llama_dir, moves):
    import logging

    from mmengine.logging import MMLogger
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_instance("tk-test-offload-check")
    logger.addHandler(handler)
    try:
        model = _model(tiny_llama_dir, offload_activations=True)
        if not moves:  # as when a model's layers take their hidden states by keyword: nothing reaches pack
            model.activation_offloader.pack = lambda tensor: tensor
            model.activation_offloader.unpack = lambda item: item
        _step(model)
        _step(model)
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if "moved no block input to host memory" in r.getMessage()]
    assert len(warnings) == (0 if moves else 1)
    assert all(r.levelno == logging.WARNING for r in warnings)


def test_offload_out_of_host_memory_is_one_clear_error(tiny_llama_dir, monkeypatch):
    model = _model(tiny_llama_dir, offload_activations=True)
    empty_like = torch.empty_like

    def no_host_memory(*args, **kwargs):
        if "pin_memory" in kwargs:  # the offloader's host buffer
            raise RuntimeError("CUDA error: out of memory\nmore detail")
        return empty_like(*args, **kwargs)
    monkeypatch.setattr(torch, "empty_like", no_host_memory)
    with pytest.raises(UserError, match=r"offload_activations: no host memory for one more checkpointed block input "
                                        r"\(0\.00 GiB; CUDA error: out of memory\); lower max_length"):
        _step(model)


def _step_again(model):
    model.zero_grad()
    return _step(model)


# ---- tiled MLP -------------------------------------------------------------------------------------------
def test_tiled_mlp_gives_the_untiled_numbers_and_tiles(tiny_llama_dir):
    reference = _step(_model(tiny_llama_dir, dropout=0.0))
    model = _model(tiny_llama_dir, dropout=0.0, tiled_mlp=8)
    rows = []
    for layer in model.llm.base_model.model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda module, args, out: rows.append(out.shape[-2]))
    _assert_same(_step(model), reference, rtol=1e-5, atol=1e-7)
    # [tokens, intermediate] never whole: 5 tiles a layer in forward and in each tile's recompute, and up to
    # 5 more in the block's recompute (non-reentrant checkpoint stops once the last tile's input is saved)
    assert set(rows) == {8} and 2 * 2 * 5 <= len(rows) <= 3 * 2 * 5, rows


@pytest.mark.parametrize("rng", ["preserved", "not_preserved"])
def test_tiled_mlp_recompute_draws_the_same_dropout_masks(tiny_llama_dir, monkeypatch, rng):
    model = _model(tiny_llama_dir, dropout=0.3, tiled_mlp=8)
    no_recompute = _chunked_without_recompute(model, monkeypatch)
    if rng == "not_preserved":  # the control: without the RNG state restored, the test must see it
        original = tiled_mlp_module.checkpoint
        monkeypatch.setattr(tiled_mlp_module, "checkpoint",
                            lambda *args, **kw: original(*args, **kw, preserve_rng_state=False))
    ours = _step_again(model)
    torch.testing.assert_close(ours[0], no_recompute[0], rtol=0, atol=0)  # forward draws are the same
    same = all(torch.equal(ours[1][n], no_recompute[1][n]) for n in ours[1])
    assert same is (rng == "preserved")


def _chunked_without_recompute(model, monkeypatch):
    """The tiled forward with the tile checkpoint replaced by a plain call: same chunks, same RNG draws."""
    with monkeypatch.context() as patch:
        patch.setattr(tiled_mlp_module, "checkpoint", lambda fn, *args, **kw: fn(*args))
        return _step(model)


@pytest.mark.parametrize("options", [dict(loss_chunk_tokens=8), dict(offload_activations=True, loss_chunk_tokens=8)],
                         ids=["chunked_loss", "chunked_loss+offload"])
def test_switches_with_lora_dropout_give_the_plain_numbers(tiny_llama_dir, options):
    reference = _step(_model(tiny_llama_dir, dropout=0.1, loss_chunk_tokens=None))
    _assert_same(_step(_model(tiny_llama_dir, dropout=0.1, **options)), reference, rtol=1e-5, atol=1e-7)


def test_all_switches_together_give_the_plain_numbers(tiny_llama_dir):
    reference = _step(_model(tiny_llama_dir, dropout=0.0))
    model = _model(tiny_llama_dir, dropout=0.0, offload_activations=True, tiled_mlp=16, loss_chunk_tokens=8)
    _assert_same(_step(model), reference, rtol=1e-5, atol=1e-7)


def test_bf16_residual_stream_option_restores_loaded_dtypes(tiny_llama_dir):
    from toolkit.model.long_context import restore_dtypes
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    loaded = {n: p.dtype for n, p in llm.named_parameters()}
    for p in llm.parameters():  # what peft's prepare_model_for_kbit_training does to unquantized weights
        p.data = p.data.float()
    assert restore_dtypes(llm, loaded) == len(loaded)
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}


# ---- bad values ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,message", [
    (dict(tiled_mlp=0), "model.tiled_mlp = 0 must be a positive number of tokens"),
    (dict(tiled_mlp=-8), "model.tiled_mlp = -8 must be a positive number of tokens"),
    (dict(loss_chunk_tokens=0), "model.loss_chunk_tokens = 0 must be a positive number of tokens"),
    (dict(offload_activations=True, gradient_checkpointing=False), "set model.gradient_checkpointing=True"),
])
def test_bad_values_are_one_clear_error(tiny_llama_dir, options, message):
    options.setdefault("gradient_checkpointing", True)
    with pytest.raises(UserError, match=re.escape(message)):
        SupervisedFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), **options)


def test_bad_value_in_a_config_is_one_line_from_tk_train(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["copy-cfg", "smollm2_135m_instruct_lora_champ_e3", str(tmp_path)]) == 0
    cfg = tmp_path / "smollm2_135m_instruct_lora_champ_e3_copy.py"
    text = re.sub(r"^pretrained_model_name_or_path = .*$", f"pretrained_model_name_or_path = {tiny_llama_dir!r}",
                  cfg.read_text(), count=1, flags=re.M)
    cfg.write_text(text.replace("    type=SupervisedFinetune,\n", "    type=SupervisedFinetune,\n    tiled_mlp=-1,\n", 1))
    capsys.readouterr()
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "work")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and "model.tiled_mlp = -1 must be a positive number of tokens" in err[0], err
