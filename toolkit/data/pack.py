"""Packing: many encoded samples into rows of at most ``max_length`` tokens, documents kept apart.

``pack_to_max_length=True``: documents are shuffled (``seed``), then placed best-fit: each goes into the open
row with the least room that still holds it, else starts a new row. A document is never split.

``pack_to_max_length='split'`` (XTuner's packing): the shuffled documents are laid end to end and cut every
``max_length`` tokens, so every row but the last is exactly full and has one length (no padding, no
unfilled row tails; the last row is shorter). A document cut at a row's end continues at the next row's start as
a piece of its own: the continuation attends only to itself, and the one target across the cut is not trained.

In a row, every document's (or piece's) position ids restart at 0 and its first label is ``IGNORE_INDEX``
(the previous document's last token must not learn to predict it), so the loss over a packed row equals the
sum over its documents alone. The attention side is in collate.py, model/varlen_attention.py and docs/data.md.
"""
from __future__ import annotations

import bisect

import numpy as np

from .encode import IGNORE_INDEX, Encoded


def _order(count: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order documents are packed in: shuffled with ``seed``, or as given."""
    return np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)


def _rows(docs: Encoded, offsets: np.ndarray) -> Encoded:
    """``docs``' tokens as rows between ``offsets``, each row's trained count from its labels."""
    trained = np.concatenate([[0], np.cumsum(docs.labels != IGNORE_INDEX, dtype=np.int64)])
    return Encoded(docs.ids, docs.labels, offsets, trained[offsets[1:]] - trained[offsets[:-1]])


def best_fit_bins(lengths, max_length: int, seed: int = 0, shuffle: bool = True) -> list:
    """Document indices per row, in the order the rows were opened."""
    order = _order(len(lengths), seed, shuffle)
    lengths = np.asarray(lengths)
    rows, room = [], []  # room: sorted (free tokens, row) of rows that can still take something
    for doc in order.tolist():
        need = int(lengths[doc])
        k = bisect.bisect_left(room, (need, -1))
        if k < len(room):
            free, row = room.pop(k)
            rows[row].append(doc)
        else:
            free, row = max_length, len(rows)
            rows.append([doc])
        if free - need > 0:
            bisect.insort(room, (free - need, row))
    return rows


def take(encoded: Encoded, indices) -> Encoded:
    """The samples at ``indices``, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    lengths = encoded.lengths[indices]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(encoded.offsets[:-1][indices] - offsets[:-1], lengths) + np.arange(int(offsets[-1]))
    return Encoded(encoded.ids[gather], encoded.labels[gather], offsets, encoded.num_trained[indices])


def pack_encoded(encoded: Encoded, rows: list) -> tuple[Encoded, list]:
    """The packed samples (one per row) and each row's document lengths."""
    docs = take(encoded, [doc for row in rows for doc in row])
    lengths = docs.lengths
    docs.labels[docs.offsets[:-1][lengths > 0]] = IGNORE_INDEX
    doc_lengths = np.split(lengths, np.cumsum([len(row) for row in rows])[:-1])
    offsets = np.concatenate([[0], np.cumsum([int(d.sum()) for d in doc_lengths])]).astype(np.int64)
    return _rows(docs, offsets), [d.tolist() for d in doc_lengths]


def pack_split(encoded: Encoded, max_length: int, seed: int = 0, shuffle: bool = True) -> tuple[Encoded, list]:
    """The documents of ``encoded`` end to end (shuffled with ``seed``), cut into rows of ``max_length`` tokens;
    returns the rows and each row's piece lengths (a document cut at a row end is two pieces)."""
    docs = take(encoded, _order(len(encoded.lengths), seed, shuffle))
    total = int(docs.offsets[-1])
    row_starts = np.arange(0, total, max_length, dtype=np.int64)
    cuts = np.union1d(docs.offsets, np.append(row_starts, total))  # every piece's start, and the end
    docs.labels[cuts[:-1]] = IGNORE_INDEX  # each piece's first target is across a document or row boundary
    offsets = np.append(row_starts, total)
    rows = _rows(docs, offsets)
    bounds = np.searchsorted(cuts, offsets)  # rows start and end on cuts
    lengths = np.diff(cuts)
    pieces = [lengths[i:j].tolist() for i, j in zip(bounds[:-1], bounds[1:])]
    return rows, pieces
