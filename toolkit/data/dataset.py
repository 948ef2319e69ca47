"""Build the training dataset from a config: records -> map fn -> encode -> drop empty -> (pack) -> cache."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys

import numpy as np
import torch
from mmengine.logging import print_log

from ..errors import UserError
from ..registry import MAP_FNS
from . import cache as cache_module
from . import encode as encode_module
from . import pack as pack_module
from . import sources as sources_module
from .cache import cached_dataset
from .encode import Encoded, encode_conversations
from .formats import FormatError, check_messages
from .pack import best_fit_bins, pack_encoded, pack_split, take
from .sources import BadRecord, describe_source, load_records
from .templates import get_template, is_auto


def resolve_map_fn(map_fn):
    """A registered format name (``'alpaca'``) or a callable from the config."""
    if map_fn is None or callable(map_fn):
        return map_fn
    fn = MAP_FNS.get(map_fn)
    if fn is None:
        raise UserError(f"unknown dataset map fn {map_fn!r}; choose one of: {', '.join(sorted(MAP_FNS.module_dict))}")
    return fn


def map_records(records: list, map_fn, source) -> tuple[list, list]:
    """``(conversations, problems)``: a conversation per good record, a one-line message per bad one."""
    conversations, problems = [], []
    where = getattr(records, "where", lambda index: None)
    for index, record in enumerate(records):
        try:
            if isinstance(record, BadRecord):
                raise FormatError(record.reason)
            if not isinstance(record, dict):
                raise FormatError(f"a record must be an object, got {type(record).__name__}")
            try:
                mapped = map_fn(record) if map_fn is not None else record
            except FormatError:
                raise
            except Exception as exc:  # a config's own map fn that trips over the record
                raise FormatError(f"the map fn raised {type(exc).__name__}: {exc}") from None
            conversations.append(check_messages(mapped.get("messages") if isinstance(mapped, dict) else None))
        except FormatError as exc:
            location = where(index)
            problems.append(f"{source}: record {index}: {exc}" + (f" ({location})" if location else ""))
    return conversations, problems


def apply_map_fn(records: list, map_fn, source) -> list:
    """Unified conversations, one per record; a bad record stops the run with its index."""
    conversations, problems = map_records(records, map_fn, source)
    if problems:
        raise UserError(problems[0])
    return conversations


class TokenizedDataset(torch.utils.data.Dataset):
    """Encoded samples (an HF ``datasets.Dataset`` with input_ids/labels/length) for the DataLoader.

    Packed samples also carry ``doc_lengths``; their items get ``position_ids`` that restart at 0 for
    every document (what tells the model where documents begin, see collate.py).
    """

    def __init__(self, hf_dataset, pad_token_id: int):
        self.data = hf_dataset
        self.pad_token_id = pad_token_id
        self.lengths = hf_dataset.data.column("length").to_pylist()  # for length-grouped sampling
        self.packed = "doc_lengths" in hf_dataset.column_names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        out = {"input_ids": item["input_ids"], "labels": item["labels"], "pad_token_id": self.pad_token_id}
        if self.packed:
            out["position_ids"] = [p for n in item["doc_lengths"] for p in range(n)]
        return out


def build_sft_dataset(tokenizer, source, map_fn=None, template="chatml", system=None, max_length=2048,
                      drop_long_samples=False, use_cache=True, pack_to_max_length=False,
                      shuffle_before_pack=True, seed=0, num_proc=1, skip_bad_records=False) -> TokenizedDataset:
    """The training set a config describes; processed once, then read from the cache.

    Samples longer than ``max_length`` are truncated, or dropped with ``drop_long_samples=True``
    (axolotl's ``drop_long_seq``: no reply is learnt without its end). Either way a sample left with
    no trained token is dropped, and the log says how many were. ``pack_to_max_length`` packs the
    samples (shuffled with ``seed`` first) into rows of ``max_length`` tokens, documents kept apart: True
    places whole documents best-fit, ``'split'`` cuts them end to end into full rows (pack.py).
    A bad record stops the run with its index, unless ``skip_bad_records`` (then it is counted and logged).
    ``num_proc`` > 1 encodes in that many processes.
    """
    from ..model.loader import build_tokenizer
    if not (pack_to_max_length is True or pack_to_max_length is False or pack_to_max_length == "split"):
        raise UserError(f"pack_to_max_length={pack_to_max_length!r}: choose False, True (whole documents, "
                        f"best fit) or 'split' (documents cut end to end into full rows)")
    tokenizer = build_tokenizer(tokenizer)
    map_fn = resolve_map_fn(map_fn)
    template_dict = get_template(template)
    settings = dict(system=system, max_length=max_length, drop_long_samples=drop_long_samples,
                    pack_to_max_length=pack_to_max_length, shuffle_before_pack=shuffle_before_pack, seed=seed,
                    skip_bad_records=skip_bad_records)
    key = _cache_key(tokenizer, source, map_fn, template_dict, settings)

    def build():
        return _build(tokenizer, source, map_fn, template_dict, num_proc=num_proc, **settings)

    hf_dataset, from_cache = cached_dataset(key, build, use_cache)
    where = f"cache {cache_module.dataset_cache_dir(key)}" if from_cache else str(source)
    print_log(f"dataset: {len(hf_dataset)} {'packed ' if pack_to_max_length else ''}samples from {where}",
              logger="current")
    return TokenizedDataset(hf_dataset, _pad_id(tokenizer))


def _build(tokenizer, source, map_fn, template, *, system, max_length, drop_long_samples, pack_to_max_length,
           shuffle_before_pack, seed, skip_bad_records, num_proc):
    records = load_records(source, tolerant=True)
    conversations, problems = map_records(records, map_fn, source)
    if problems and not skip_bad_records:
        more = f" (and {len(problems) - 1} more bad records)" if len(problems) > 1 else ""
        raise UserError(f"{problems[0]}{more}; fix the data, or set skip_bad_records=True to leave them out")
    if problems:
        print_log(f"dataset: skipped {len(problems)} of {len(records)} bad records, e.g. {problems[0]}",
                  logger="current", level=logging.WARNING)
    limit = max_length + 1 if drop_long_samples else max_length
    encoded = _encode(conversations, tokenizer, template, limit, system, num_proc)
    keep = (encoded.num_trained > 0) & (encoded.lengths <= max_length)
    dropped = int((~keep).sum())
    if not keep.any():
        raise UserError(f"{source}: all {dropped} samples were dropped (no trained token within "
                        f"max_length={max_length}); raise max_length or check the data")
    if dropped:
        reason = "longer than" if drop_long_samples else "with no trained token within"
        print_log(f"dataset: dropped {dropped} of {len(conversations)} samples {reason} "
                  f"max_length={max_length}", logger="current", level=logging.WARNING)
    encoded = take(encoded, np.flatnonzero(keep))
    doc_lengths = None
    if pack_to_max_length == "split":
        tokens = int(encoded.lengths.sum())
        encoded, doc_lengths = pack_split(encoded, max_length, seed=seed, shuffle=shuffle_before_pack)
        cut = sum(len(pieces) for pieces in doc_lengths) - (len(keep) - dropped)
        print_log(f"dataset: packed {len(keep) - dropped} samples ({tokens} tokens) end to end into "
                  f"{len(doc_lengths)} rows of {max_length} tokens (the last {int(encoded.lengths[-1])}); "
                  f"{cut} documents cut at a row end", logger="current")
    elif pack_to_max_length:
        rows = best_fit_bins(encoded.lengths, max_length, seed=seed, shuffle=shuffle_before_pack)
        tokens = int(encoded.lengths.sum())
        encoded, doc_lengths = pack_encoded(encoded, rows)
        print_log(f"dataset: packed {len(keep) - dropped} samples ({tokens} tokens) into {len(rows)} rows of "
                  f"<= {max_length} tokens ({tokens / (len(rows) * max_length):.1%} full)", logger="current")
    return _to_hf_dataset(encoded, doc_lengths)


def _encode(conversations, tokenizer, template, limit, system, num_proc) -> Encoded:
    if num_proc <= 1 or len(conversations) < 2 * num_proc:
        return encode_conversations(conversations, tokenizer, template, limit, system=system)
    import multiprocessing as mp
    bounds = np.linspace(0, len(conversations), num_proc + 1).astype(int).tolist()
    if "fork" in mp.get_all_start_methods():  # the workers inherit the work; only the results travel back
        _SHARED["work"] = (conversations, tokenizer, template, limit, system)
        try:
            with mp.get_context("fork").Pool(num_proc) as pool:
                return _concat(pool.starmap(_encode_forked, zip(bounds, bounds[1:])))
        finally:
            _SHARED.clear()
    shards = [(conversations[a:b], tokenizer, template, limit, system) for a, b in zip(bounds, bounds[1:])]
    with mp.get_context("spawn").Pool(num_proc) as pool:
        return _concat(pool.starmap(_encode_shard, shards))


_SHARED = {}


def _encode_forked(start: int, end: int) -> Encoded:
    conversations, tokenizer, template, limit, system = _SHARED["work"]
    return _encode_shard(conversations[start:end], tokenizer, template, limit, system)


def _encode_shard(conversations, tokenizer, template, limit, system) -> Encoded:
    return encode_conversations(conversations, tokenizer, template, limit, system=system, progress=False)


def _concat(parts: list) -> Encoded:
    shift = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
    return Encoded(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]),
                   offsets, np.concatenate([p.num_trained for p in parts]))


def _to_hf_dataset(encoded: Encoded, doc_lengths: list | None):
    import datasets
    import pyarrow as pa

    def lists(values, offsets):
        if offsets[-1] < 2**31 - 1:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))

    columns = {"input_ids": lists(encoded.ids, encoded.offsets), "labels": lists(encoded.labels, encoded.offsets),
               "length": pa.array(encoded.lengths.astype(np.int32))}
    if doc_lengths is not None:
        columns["doc_lengths"] = pa.array(doc_lengths, type=pa.list_(pa.int32()))
    return datasets.Dataset(pa.table(columns))


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:  # llama-style tokenizers have no pad token; EOS is masked anyway
        return tokenizer.eos_token_id
    raise UserError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token in the config")


def _cache_key(tokenizer, source, map_fn, template: dict, settings: dict) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_id = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    code = [encode_module, pack_module, sources_module, sys.modules[__name__]]
    parts = {
        "source": describe_source(source),
        "map_fn": inspect.getsource(map_fn) if map_fn is not None else None,
        "code": hashlib.sha256("".join(inspect.getsource(m) for m in code).encode()).hexdigest(),
        "template": template,
        "chat_template": getattr(tokenizer, "chat_template", None) if is_auto(template) else None,
        "tokenizer": hashlib.sha256(tokenizer_id.encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        **settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
