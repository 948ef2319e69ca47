"""Fuzzing the data path with hypothesis: random conversations (any role order, empty and unicode contents,
long turns, system prompts, loss flags) and random raw records through every map fn, every template
(named ones and 'auto', the tokenizer's own) and encode + packing.

Properties: a label only ever sits on a token of an assistant reply that is trained (never on a prompt,
system or ``loss: False`` token), and equals the input id there; no sample is longer than max_length; a
bad record raises the project's ``FormatError`` (or ``UserError``), nothing else. The number of cases run
is written to the terminal at the end of the module.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.data import formats  # noqa: F401  (registers the map fns)
from toolkit.data.encode import IGNORE_INDEX, encode_conversation, encode_conversations
from toolkit.data.formats import FormatError, check_messages
from toolkit.data.pack import best_fit_bins, pack_encoded, take
from toolkit.data.templates import PROMPT_TEMPLATES, get_template, is_auto
from toolkit.errors import UserError
from toolkit.registry import MAP_FNS

CASES = {"conversations": 0, "conversations encoded": 0, "packed batches": 0, "records": 0, "records mapped": 0,
         "project errors": 0}
SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TEMPLATES = sorted(PROMPT_TEMPLATES) + ["auto"]
SENTINEL = "§"  # marks each message's content; never produced by the random text below

text = st.text(st.characters(blacklist_characters=SENTINEL, blacklist_categories=("Cs",)), max_size=40)
long_text = st.builds(lambda word, n: (word + " ") * n, st.sampled_from(["step", "数学", "🙂", "x=1;"]),
                      st.integers(50, 400))
contents = st.one_of(text, text, long_text, st.just(""))
loss_flags = st.sampled_from(["absent", True, False, None])


@st.composite
def conversations(draw, max_messages=8):
    """Well-formed messages in any order, each content tagged ``§<kind><i>§`` so its tokens can be found."""
    messages = []
    for i in range(draw(st.integers(0, max_messages))):
        role = draw(st.sampled_from(["system", "user", "assistant"]))
        message = {"role": role}
        loss = draw(loss_flags) if role == "assistant" else "absent"
        if loss != "absent":
            message["loss"] = loss
        kind = {"system": "S", "user": "U"}.get(role, "N" if loss is False else "A")
        message["content"] = f"{draw(contents)}{SENTINEL}{kind}{i}{SENTINEL}{draw(contents)}"
        messages.append(message)
    return messages


@pytest.fixture(scope="module", autouse=True)
def report_cases(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    line = "hypothesis cases run: " + ", ".join(f"{n} {what}" for what, n in CASES.items())
    if reporter is not None:
        reporter.write_line(f"\n{line}")


def trained_text_ids(messages, tokenizer, template) -> list:
    """The ids a named template trains, derived from the messages alone: each trained assistant reply with
    the template's SUFFIX, tokenized on its own, then EOS unless the SUFFIX is the end marker."""
    ids = []
    for message in messages:
        if message["role"] == "assistant" and message.get("loss") is not False:
            ids += tokenizer(message["content"] + template.get("SUFFIX", ""), add_special_tokens=False)["input_ids"]
            if not template.get("SUFFIX_AS_EOS", False):
                ids.append(tokenizer.eos_token_id)
    return ids


def check_sample(sample: dict, messages, tokenizer, template, max_length: int) -> None:
    ids, labels = sample["input_ids"], sample["labels"]
    assert len(ids) == len(labels) <= max_length
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))  # a label is its own token
    trained = [label for label in labels if label != IGNORE_INDEX]
    assert sample["num_trained"] == len(trained)
    # no label on a prompt token: the decoded trained runs hold no system / user / untrained-reply marker
    runs, run = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if run:
                runs.append(tokenizer.decode(run))
            run = []
        else:
            run.append(label)
    for decoded in runs:
        for kind in "SUN":
            assert f"{SENTINEL}{kind}" not in decoded, (kind, decoded)
    if not is_auto(template):  # exactly the assistant replies' tokens, in order (a prefix where cut)
        expected = trained_text_ids(messages, tokenizer, template)
        assert trained == expected[:len(trained)]
        if len(ids) < max_length:
            assert trained == expected
    elif len(ids) < max_length:  # 'auto': every trained reply's marker is trained
        trained_text = "".join(runs)
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and message.get("loss") is not False:
                assert f"{SENTINEL}A{i}{SENTINEL}" in trained_text


@SETTINGS
@given(messages=conversations(), template_name=st.sampled_from(TEMPLATES), max_length=st.integers(1, 300),
       system=st.one_of(st.none(), text))
def test_random_conversations_encode_safely(tokenizer, messages, template_name, max_length, system):
    CASES["conversations"] += 1
    template = get_template(template_name)
    try:
        check_messages(messages)
        sample = encode_conversation(messages, tokenizer, template, max_length, system=system)
    except FormatError:  # e.g. no assistant message, or a chat template that refuses the role order
        CASES["project errors"] += 1
        return
    CASES["conversations encoded"] += 1
    if system and (not messages or messages[0]["role"] != "system") and is_auto(template):
        messages = [{"role": "system", "content": system}] + messages
    check_sample(sample, messages, tokenizer, template, max_length)


@SETTINGS
@given(batch=st.lists(conversations(max_messages=6), min_size=1, max_size=6),
       template_name=st.sampled_from(sorted(PROMPT_TEMPLATES)), max_length=st.integers(4, 200))
def test_batches_encode_like_one_at_a_time_and_pack_within_max_length(tokenizer, batch, template_name, max_length):
    CASES["packed batches"] += 1
    template = get_template(template_name)
    good = []
    for messages in batch:
        try:
            good.append(check_messages(messages))
        except FormatError:
            CASES["project errors"] += 1
    if not good:
        return
    encoded = encode_conversations(good, tokenizer, template, max_length, progress=False)
    for i, messages in enumerate(good):
        sample = encoded.sample(i)
        assert sample == encode_conversation(messages, tokenizer, template, max_length)
        check_sample(sample, messages, tokenizer, template, max_length)
    keep = np.flatnonzero(encoded.num_trained > 0)
    if not len(keep):
        return
    docs = take(encoded, keep)
    rows = best_fit_bins(docs.lengths, max_length, seed=0)
    assert sorted(d for row in rows for d in row) == list(range(len(keep)))  # every document, once
    packed, doc_lengths = pack_encoded(docs, rows)
    assert all(n <= max_length for n in packed.lengths)
    for r, row in enumerate(rows):
        assert sum(doc_lengths[r]) == packed.lengths[r]
        start = packed.offsets[r]
        for doc in row:
            original = docs.sample(doc)
            n = len(original["input_ids"])
            assert packed.ids[start:start + n].tolist() == original["input_ids"]
            labels = packed.labels[start:start + n].tolist()
            # a document's first token is never trained in a row: it would be predicted from the previous one
            assert labels[0] == IGNORE_INDEX and labels[1:] == original["labels"][1:]
            start += n


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | text | st.sampled_from(["human", "gpt", "user", "assistant",
                                                                            "system", "bot", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(sorted(
        {"from", "value", "role", "content", "loss", "input", "output", "system", "output_with_loss"})),
        inner, max_size=4),
    max_leaves=12)
FIELDS = sorted({"instruction", "input", "output", "conversations", "messages", "conversation", "system", "problem",
                 "solution", "steps", "answer", "dialog", "categories", "text", "id", "question", "response"})
junk = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5) | json_values


def field(good):
    """Mostly a value of the right shape, sometimes anything (a wrong type, a missing part)."""
    return st.integers(0, 6).flatmap(lambda k: json_values if k == 0 else good)


words = st.builds(lambda a, b: f"{a}w{b}", text, text) | long_text  # not blank


def turns(make, max_size=5):
    return st.lists(field(make), min_size=1, max_size=max_size) | st.just([])


#: records shaped like each format (values drawn at random, now and then of the wrong type)
SHAPED = {
    "alpaca": st.fixed_dictionaries({"instruction": field(words), "output": field(words)},
                                    optional={"input": field(words)}),
    "sharegpt": st.fixed_dictionaries({"conversations": turns(st.fixed_dictionaries({
        "from": st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"]), "value": field(words)}))}),
    "openai": st.fixed_dictionaries({"messages": field(conversations(max_messages=5))}),
    "conversation": st.fixed_dictionaries({"conversation": turns(st.fixed_dictionaries(
        {"input": field(words), "output": field(words)},
        optional={"system": field(words), "output_with_loss": field(st.booleans())}))}),
    "champ": st.fixed_dictionaries({"problem": field(words), "steps": turns(words), "answer": field(words)}),
    "math": st.fixed_dictionaries({"problem": field(words), "solution": field(words)}),
    "chatterbot": st.fixed_dictionaries({"dialog": turns(words)}, optional={"categories": turns(text)}),
    "text": st.fixed_dictionaries({"text": field(words)}),
}


@st.composite
def records(draw):
    map_fn = draw(st.sampled_from(sorted(MAP_FNS.module_dict)))
    shaped = SHAPED.get(map_fn, junk)
    return map_fn, draw(junk if draw(st.integers(0, 6)) == 0 else shaped)


@SETTINGS
@given(case=records())
def test_random_records_map_to_valid_conversations_or_a_clear_error(tokenizer, case):
    map_fn, record = case
    CASES["records"] += 1
    try:
        mapped = MAP_FNS.get(map_fn)(record)
        messages = check_messages(mapped.get("messages") if isinstance(mapped, dict) else None)
    except (FormatError, UserError) as exc:
        assert str(exc) and "\n" not in str(exc)
        CASES["project errors"] += 1
        return
    CASES["records mapped"] += 1
    template = get_template("chatml")
    sample = encode_conversation(messages, tokenizer, template, 64)
    assert len(sample["input_ids"]) <= 64
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(sample["labels"], sample["input_ids"]))


def test_the_fuzzers_ran():
    """Runs after the fuzz tests in this module: they drew their examples (not skipped by a filter)."""
    assert CASES["conversations"] >= 100 and CASES["records"] >= 100 and CASES["packed batches"] >= 100, CASES
    assert CASES["conversations encoded"] >= 30 and CASES["records mapped"] >= 30, CASES  # not all rejected
