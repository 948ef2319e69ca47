"""tools/bench_packing_gpu.py builds one epoch three ways from real lengths, the way tk's collate functions do
(the timing itself needs a GPU; these check what it would time)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_packing_gpu import epoch_batches, main  # noqa: E402

LENGTHS = [700, 1200, 300, 90, 2048, 500, 640, 33, 1000]


def _docs(position_ids):
    """Document lengths in a packed row: the position ids restart at 0 for each one."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def test_packed_rows_hold_every_document_once_within_max_length():
    rows = epoch_batches(LENGTHS, "packed", batch_size=4, max_length=2048, vocab=100)
    docs = [d for row in rows for d in _docs(row["position_ids"][0])]
    assert sorted(docs) == sorted(LENGTHS)
    for row in rows:
        assert row["input_ids"].shape == row["labels"].shape == row["position_ids"].shape
        assert row["input_ids"].shape[0] == 1 and row["input_ids"].shape[1] <= 2048
        assert (row["labels"] != -100).all() and "attention_mask" not in row


def test_padded_batches_pad_to_their_longest_and_full_rows_match_the_packed_count():
    padded = epoch_batches(LENGTHS, "padded", batch_size=4, max_length=2048, vocab=100)
    real = sorted(int(m.sum()) for b in padded for m in b["attention_mask"])
    assert sorted(set(real)) == sorted(set(LENGTHS))  # the sampler rounds the epoch up by repeating samples
    for b in padded:
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max())
        assert ((b["labels"] != -100) == b["attention_mask"].bool()).all()
    packed = epoch_batches(LENGTHS, "packed", batch_size=4, max_length=2048, vocab=100)
    full = epoch_batches(LENGTHS, "full", batch_size=4, max_length=2048, vocab=100)
    assert len(full) == len(packed) and all(b["input_ids"].shape == (1, 2048) for b in full)


def test_refuses_to_run_without_cuda(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--model", "m", "--lengths", "l.json"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_padding_to_a_multiple_adds_only_ignored_positions_and_a_separate_tail_document():
    from bench_packing_gpu import pad_to_multiple
    rows = epoch_batches(LENGTHS, "packed", batch_size=4, max_length=2048, vocab=100)
    packed = next(row for row in rows if row["input_ids"].shape[1] % 128)  # a row that needs a tail
    rounded = pad_to_multiple(packed, 128)
    length = packed["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] % 128 == 0 and rounded["input_ids"].shape[1] - length < 128
    assert (rounded["labels"][:, :length] == packed["labels"]).all() and (rounded["labels"][:, length:] == -100).all()
    tail = rounded["position_ids"][0, length:]
    assert tail.tolist() == list(range(len(tail)))  # its own document: the real ones never see it
    padded = epoch_batches(LENGTHS, "padded", batch_size=4, max_length=2048, vocab=100)[0]
    rounded = pad_to_multiple(padded, 64)
    assert rounded["attention_mask"].sum() == padded["attention_mask"].sum()
    assert ((rounded["labels"] != -100) == rounded["attention_mask"].bool()).all()


def test_real_tokens_count_the_documents_not_the_padding():
    from bench_packing_gpu import pad_to_multiple, real_tokens
    for way in ("padded", "packed"):
        epoch = epoch_batches(LENGTHS, way, batch_size=4, max_length=2048, vocab=100)
        rounded = [pad_to_multiple(batch, 256) for batch in epoch]
        assert sum(real_tokens(b) for b in rounded) == sum(real_tokens(b) for b in epoch)
    packed = epoch_batches(LENGTHS, "packed", batch_size=4, max_length=2048, vocab=100)
    assert sum(real_tokens(b) for b in packed) == sum(LENGTHS)
