import json

import pytest

from toolkit.data.dataset import apply_map_fn, resolve_map_fn
from toolkit.data.sources import load_records
from toolkit.errors import UserError


def test_champ_record_becomes_steps_and_answer():
    records = load_records("champ")
    assert len(records) == 270
    first = records[0]
    assert first["id"] == "P_Combinatorics_1" and first["answer"] == "239"
    messages = resolve_map_fn("champ")(first)["messages"]
    assert messages[0] == {"role": "user", "content": first["problem"]}
    reply = messages[1]["content"]
    assert reply.startswith("Step 1: Let x_n, y_n, z_n be the number")
    assert reply.endswith("\nFinal answer: 239")
    assert reply.count("\nStep ") == len(first["steps"]) - 1


def test_alpaca_with_and_without_input():
    fn = resolve_map_fn("alpaca")
    assert fn({"instruction": "翻译成英文", "input": "猫", "output": "cat"})["messages"] == [
        {"role": "user", "content": "翻译成英文\n猫"}, {"role": "assistant", "content": "cat"}]
    assert fn({"instruction": "Say hi", "input": "", "output": "hi"})["messages"][0]["content"] == "Say hi"


def test_openai_messages_keep_loss_flag():
    fn = resolve_map_fn("openai")
    out = fn({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss": False},
                           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    assert out["messages"][1] == {"role": "assistant", "content": "b", "loss": False}
    assert "loss" not in out["messages"][3]


def test_math_release_folder_layout(tmp_path):
    for subject, n in (("algebra", 1), ("geometry", 7)):
        (tmp_path / "train" / subject).mkdir(parents=True)
        (tmp_path / "train" / subject / f"{n}.json").write_text(json.dumps(
            {"problem": f"P{n}", "level": "Level 1", "type": subject, "solution": f"S{n} $\\boxed{{{n}}}$"}))
    records = load_records(str(tmp_path / "train"))
    conversations = apply_map_fn(records, resolve_map_fn("math"), "MATH")
    assert conversations == [
        [{"role": "user", "content": "P1"}, {"role": "assistant", "content": "S1 $\\boxed{1}$"}],
        [{"role": "user", "content": "P7"}, {"role": "assistant", "content": "S7 $\\boxed{7}$"}]]


@pytest.mark.parametrize("record, message", [
    ({"input": "x", "output": "y"}, "record 1: missing field 'instruction'"),
    ({"instruction": 3, "output": "y"}, "record 1: field 'instruction' must be a string, got int"),
    ({"instruction": "x", "output": ""}, "record 1: field 'output' is empty"),
])
def test_bad_alpaca_record_names_its_index(record, message):
    good = {"instruction": "a", "output": "b"}
    with pytest.raises(UserError, match=message):
        apply_map_fn([good, record], resolve_map_fn("alpaca"), "data.json")


def test_openai_without_assistant_is_refused():
    with pytest.raises(UserError, match="record 0: the conversation has no assistant message"):
        apply_map_fn([{"messages": [{"role": "user", "content": "hi"}]}], resolve_map_fn("openai"), "d")


def test_unknown_map_fn_lists_choices():
    with pytest.raises(UserError, match="unknown dataset map fn 'alpacca'; choose one of: alpaca"):
        resolve_map_fn("alpacca")


def test_jsonl_file_and_bad_files(tmp_path):
    good = tmp_path / "data.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert [r["instruction"] for r in load_records(str(good))] == ["a", "c"]
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(UserError, match="the data file is empty"):
        load_records(str(empty))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": ')
    with pytest.raises(UserError, match="broken.json: could not be read as json"):
        load_records(str(broken))
    with pytest.raises(UserError, match="neither a file/folder nor a packaged source"):
        load_records(str(tmp_path / "missing.json"))
