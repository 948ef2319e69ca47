"""Packing keeps documents apart: position ids restart, attention stays inside each document, and the
logits and the loss of a packed row equal those of its documents run alone (tiny llama, CPU)."""
import json

import numpy as np
import pytest
import torch

from toolkit.data.collate import sft_collate_fn
from toolkit.data.dataset import apply_map_fn, build_sft_dataset, resolve_map_fn
from toolkit.data.encode import IGNORE_INDEX, Encoded, encode_conversations
from toolkit.data.pack import best_fit_bins, pack_encoded, pack_split
from toolkit.data.sources import load_records
from toolkit.data.templates import get_template
from toolkit.errors import UserError
from toolkit.model.loss import causal_lm_loss


def test_best_fit_rows_hold_every_document_once_and_fill_well():
    lengths = np.random.default_rng(1).integers(5, 90, size=500)
    rows = best_fit_bins(lengths, 100, seed=3)
    assert sorted(d for row in rows for d in row) == list(range(500))
    assert max(sum(lengths[d] for d in row) for row in rows) <= 100
    assert lengths.sum() / (len(rows) * 100) > 0.9
    assert rows == best_fit_bins(lengths, 100, seed=3) and rows != best_fit_bins(lengths, 100, seed=4)
    assert rows[0][0] != 0 or rows[1][0] != 1  # shuffled before packing
    firsts = [row[0] for row in best_fit_bins(lengths, 100, shuffle=False)]
    assert firsts == sorted(firsts) and [row[0] for row in rows] != sorted(row[0] for row in rows)


def champ_encoded(tokenizer, n, max_length=4096):
    conversations = apply_map_fn(load_records("champ"), resolve_map_fn("champ"), "champ")[:n]
    return encode_conversations(conversations, tokenizer, get_template("chatml"), max_length, progress=False)


def test_packed_items_and_collate(tokenizer):
    encoded = champ_encoded(tokenizer, 3)
    packed, doc_lengths = pack_encoded(encoded, [[2, 0], [1]])
    assert doc_lengths == [[int(encoded.lengths[2]), int(encoded.lengths[0])], [int(encoded.lengths[1])]]
    row = packed.sample(0)
    assert row["input_ids"] == encoded.sample(2)["input_ids"] + encoded.sample(0)["input_ids"]
    second = int(encoded.lengths[2])
    assert row["labels"][second] == IGNORE_INDEX  # the first token of a document is never a target
    assert row["labels"][:second] == encoded.sample(2)["labels"]
    items = [{"input_ids": packed.sample(r)["input_ids"], "labels": packed.sample(r)["labels"], "pad_token_id": 2,
              "position_ids": [p for n in doc_lengths[r] for p in range(n)]} for r in range(2)]
    batch = sft_collate_fn(items)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: attention follows positions
    total = int(encoded.lengths[:3].sum())
    assert batch["input_ids"].shape == (1, total)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, second, int(doc_lengths[0][0] + doc_lengths[0][1])]


def check_packed_logits(model, tokenizer, device, atol):
    """A row packed from 4 CHAMP samples gives each of them the logits it gets alone."""
    encoded = champ_encoded(tokenizer, 4, max_length=300)
    packed, doc_lengths = pack_encoded(encoded, [[3, 1, 0, 2]])
    item = {"input_ids": packed.sample(0)["input_ids"], "labels": packed.sample(0)["labels"], "pad_token_id": 2,
            "position_ids": [p for n in doc_lengths[0] for p in range(n)]}
    batch = {k: v.to(device) for k, v in sft_collate_fn([item]).items()}
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         use_cache=False).logits[0].float()
        plain_causal = model(input_ids=batch["input_ids"], use_cache=False).logits[0].float()
        start = 0
        for doc in (3, 1, 0, 2):
            alone = model(input_ids=torch.tensor([encoded.sample(doc)["input_ids"]], device=device),
                          use_cache=False).logits[0].float()
            torch.testing.assert_close(together[start:start + len(alone)], alone, atol=atol, rtol=0)
            start += len(alone)
    later = int(encoded.lengths[3])
    assert (plain_causal[later:] - together[later:]).abs().max() > 20 * atol  # without the positions they'd leak


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(tiny_llama_dir, tokenizer, attn):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    check_packed_logits(model, tokenizer, "cpu", atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn, dtype, atol", [("sdpa", torch.float32, 1e-4), ("eager", torch.float32, 1e-4),
                                               ("flex_attention", torch.float32, 1e-4),
                                               ("flash_attention_2", torch.bfloat16, 2e-2)])
def test_packed_logits_on_gpu(tiny_llama_dir, tokenizer, attn, dtype, atol):
    import importlib.util

    from transformers import AutoModelForCausalLM
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed on this machine")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attn, dtype=dtype)
    check_packed_logits(model.to("cuda").eval(), tokenizer, "cuda", atol=atol)


def test_packed_dataset_trains_on_the_same_loss(tiny_llama_dir, tokenizer, tmp_path):
    """Token-weighted loss over the whole CHAMP set: packed rows (collated two at a time) == samples alone.

    (transformers derives the packed mask from position ids only without a KV cache: training passes
    ``use_cache=False``, as ``causal_lm_loss`` does.)"""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    source = tmp_path / "champ60.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in load_records("champ")[:60]))
    common = dict(tokenizer=tokenizer, source=str(source), map_fn="champ", template="chatml", max_length=1024)
    packed = build_sft_dataset(**common, pack_to_max_length=True)
    plain = build_sft_dataset(**common)
    assert len(packed) < len(plain) / 1.5 and sum(packed.lengths) == sum(plain.lengths)

    def total_loss(dataset, batch_size):
        loss_sum, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = sft_collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss_sum += float(causal_lm_loss(model, **batch)) * n
                tokens += n
        return loss_sum, tokens

    packed_loss, packed_tokens = total_loss(packed, 2)
    plain_loss, plain_tokens = total_loss(plain, 4)
    assert packed_tokens == plain_tokens
    assert packed_loss == pytest.approx(plain_loss, rel=1e-5)


def test_split_packing_lays_documents_end_to_end_in_full_rows():
    """Three documents of 5, 7 and 3 tokens in rows of 6: [doc0 + doc1's first token], [doc1's other 6], [doc2];
    every piece's first target is untrained (it would be predicted across a document or row boundary)."""
    ids = np.arange(1, 16, dtype=np.int32)
    encoded = Encoded(ids, ids.copy(), np.array([0, 5, 12, 15]), np.array([5, 7, 3]))
    rows, pieces = pack_split(encoded, 6, shuffle=False)
    assert rows.offsets.tolist() == [0, 6, 12, 15] and pieces == [[5, 1], [6], [3]]
    assert rows.ids.tolist() == ids.tolist()
    assert rows.labels.tolist() == [IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9, 10, 11, 12,
                                    IGNORE_INDEX, 14, 15]
    assert rows.num_trained.tolist() == [4, 5, 2]


def test_split_packing_of_champ_keeps_every_token_and_fills_every_row(tokenizer):
    encoded = champ_encoded(tokenizer, 40, max_length=1024)
    rows, pieces = pack_split(encoded, 1000, seed=3)
    order = np.random.default_rng(3).permutation(40)
    assert rows.ids.tolist() == np.concatenate([encoded.ids[encoded.offsets[i]:encoded.offsets[i + 1]]
                                                for i in order]).tolist()
    lengths = rows.lengths.tolist()
    assert set(lengths[:-1]) == {1000} and 0 < lengths[-1] <= 1000
    assert [sum(p) for p in pieces] == lengths
    # trained targets lost: only those at a cut inside a document (the first token of a document is a prompt)
    doc_starts = set(np.cumsum([0] + [int(encoded.lengths[i]) for i in order]).tolist())
    cuts_inside = [r * 1000 for r in range(1, len(lengths)) if r * 1000 not in doc_starts]
    before = np.concatenate([encoded.labels[encoded.offsets[i]:encoded.offsets[i + 1]] for i in order])
    lost = sum(int(before[c] != IGNORE_INDEX) for c in cuts_inside)
    assert int(rows.num_trained.sum()) == int(encoded.num_trained.sum()) - lost
    assert sum(len(p) for p in pieces) == 40 + len(cuts_inside)


def test_split_packed_dataset_and_a_bad_pack_value(tokenizer, tmp_path):
    source = tmp_path / "champ30.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in load_records("champ")[:30]))
    common = dict(tokenizer=tokenizer, source=str(source), map_fn="champ", template="chatml", max_length=512)
    split = build_sft_dataset(**common, pack_to_max_length="split")
    plain = build_sft_dataset(**common)
    assert sum(split.lengths) == sum(plain.lengths) and set(split.lengths[:-1]) == {512}
    item = split[0]
    assert item["position_ids"][0] == 0 and len(item["position_ids"]) == 512
    with pytest.raises(UserError, match="pack_to_max_length='yes': choose False, True"):
        build_sft_dataset(**common, pack_to_max_length="yes")
    with pytest.raises(UserError, match="pack_to_max_length=1: choose"):
        build_sft_dataset(**common, pack_to_max_length=1)
    best_fit = build_sft_dataset(**common, pack_to_max_length=True)  # its own cache entry, not the split one
    assert sorted(best_fit.lengths) != sorted(split.lengths) and max(best_fit.lengths) <= 512
