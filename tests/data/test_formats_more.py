"""The other formats (sharegpt, XTuner conversation, plain text, chatterbot YAML), on real data where
the system has it (Debian fortunes / fortunes-zh, chatterbot-corpus), and bad records named by index."""
import json
from pathlib import Path

import pytest

from toolkit.data.dataset import apply_map_fn, build_sft_dataset, map_records, resolve_map_fn
from toolkit.data.sources import BadRecord, load_records
from toolkit.errors import UserError

FORTUNES = Path("/usr/share/games/fortunes")


def test_sharegpt_roles_qwen_vl_text_and_repairs():
    fn = resolve_map_fn("sharegpt")
    vl = "Picture 1: <img>/data/cat.jpg</img>\nWhere is the cat?"
    box = "<ref>The cat</ref><box>(120,40),(380,300)</box>"
    record = {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "gpt", "value": "(a reply with no prompt)"},
        {"from": "human", "value": vl}, {"from": "gpt", "value": box},
        {"from": "user", "value": "And"}, {"from": "human", "value": "the dog?"},
        {"from": "chatgpt", "value": "No dog."}, {"from": "human", "value": "(unanswered)"}]}
    assert fn(record)["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": vl},
        {"role": "assistant", "content": box}, {"role": "user", "content": "And\n\nthe dog?"},
        {"role": "assistant", "content": "No dog."}]


def test_xtuner_conversation_format():
    fn = resolve_map_fn("conversation")
    out = fn({"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello!"},
                               {"input": "2+2?", "output": "4", "output_with_loss": False}]})
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "loss": False}]


def fortune_file(tmp_path, name="fortunes"):
    real = FORTUNES / name
    if real.is_file():
        return real
    path = tmp_path / name  # Debian's fortunes-min is not installed: a file of the same layout
    path.write_text("A day for firm decisions!!!!!  Or is it?\n%\nA few hours grace before the madness begins "
                    "again.\n%\nA gift of a flower will soon be made to you.\n%\n")
    return path


def test_percent_separated_text_for_pretraining(tmp_path, tokenizer):
    path = fortune_file(tmp_path)
    records = load_records(str(path))
    assert records[0] == {"text": "A day for firm decisions!!!!!  Or is it?"}
    assert all("%" != r["text"].strip() and r["text"] for r in records) and len(records) >= 3
    dataset = build_sft_dataset(tokenizer, str(path), "text", "pretrain", max_length=64, use_cache=False)
    first = dataset[0]
    text_ids = tokenizer("A day for firm decisions!!!!!  Or is it?", add_special_tokens=False)["input_ids"]
    assert first["input_ids"] == text_ids + [tokenizer.eos_token_id]
    assert first["labels"] == first["input_ids"]  # every token trained, EOS included


def test_chinese_poems_folder_without_terminal_colours(tmp_path):
    folder = FORTUNES
    if not (folder / "tang300").is_file():  # fortunes-zh not installed: same layout, written here
        folder = tmp_path / "zh"
        folder.mkdir()
        (folder / "tang300").write_text("\x1b[32m《感遇・其一》\x1b[m\n\x1b[33m作者：张九龄\x1b[m\n兰叶春葳蕤，桂华秋皎洁。\n%\n"
                                        "\x1b[32m《送别》\x1b[m\n下马饮君酒，问君何所之。\n%\n", encoding="utf-8")
        (folder / "tang300.dat").write_bytes(b"\x00\x00\x00\x02")
        (folder / "tang300.u8").symlink_to(folder / "tang300")
    records = load_records(str(folder))
    poems = [r["text"] for r in records if r["text"].startswith("《感遇・其一》")]
    assert len(poems) == 1  # the .u8 links are not read a second time
    assert poems[0].startswith("《感遇・其一》\n作者：张九龄\n兰叶春葳蕤")
    assert not any("\x1b" in r["text"] for r in records)


def chatterbot_dir(tmp_path):
    try:
        import chatterbot_corpus
        return Path(chatterbot_corpus.__file__).parent / "data"
    except ImportError:  # the corpus is not installed: two files of its layout
        root = tmp_path / "chatterbot"
        (root / "chinese").mkdir(parents=True)
        (root / "chinese" / "greetings.yml").write_text(
            "categories:\n- greetings\nconversations:\n- - 你好\n  - 嗨\n- - 嗨，最近如何?\n  - 挺好\n", encoding="utf-8")
        (root / "english").mkdir()
        (root / "english" / "trivia.yml").write_text(
            "categories:\n- trivia\nconversations:\n- - Is it?\n  - yes\n"
            "- In a game of bingo, which number is two little ducks? - '22'\n", encoding="utf-8")
        return root


def test_chatterbot_yaml_dialogs_and_their_bad_entries(tmp_path):
    root = chatterbot_dir(tmp_path)
    records = load_records(str(root / "chinese" / "greetings.yml"))
    assert records[0] == {"dialog": ["你好", "嗨"], "categories": ["greetings"]}
    assert resolve_map_fn("chatterbot")(records[0])["messages"] == [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}]
    trivia = load_records(str(root / "english" / "trivia.yml"))
    lines = [line for r in trivia if isinstance(r["dialog"], list) for line in r["dialog"]]
    assert lines and all(isinstance(line, str) for line in lines)  # YAML's yes / 42 stay text
    conversations, problems = map_records(trivia, resolve_map_fn("chatterbot"), "trivia.yml")
    assert conversations and problems  # the corpus really has a dialog written as one string
    assert any("field 'dialog' must be a list, got str (trivia.yml, conversation" in p for p in problems)


@pytest.mark.parametrize("content, index, reason", [
    ('{"instruction": "a", "output": "b"}\n{"output": "b"}\n', 1, "missing field 'instruction' (line 2)"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": ["a"], "output": "b"}\n', 1,
     "field 'instruction' must be a string, got list (line 2)"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b"}\n{"instruction": "c", "out', 2,
     "truncated JSON: the file ends inside this record (line 4)"),
])
def test_bad_jsonl_record_is_one_line_with_its_index(tmp_path, tokenizer, content, index, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        build_sft_dataset(tokenizer, str(path), "alpaca", use_cache=False)
    message = str(info.value)
    assert message.startswith(f"{path}: record {index}: {reason}") and "\n" not in message


def test_empty_conversation_and_non_utf8(tmp_path):
    path = tmp_path / "chats.json"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_bytes(b"[\n" + json.dumps(good).encode() + b",\n" + b'{"conversations": []},\n'
                     + b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}\n]')
    records = load_records(str(path), tolerant=True)
    assert isinstance(records[2], BadRecord)
    conversations, problems = map_records(records, resolve_map_fn("sharegpt"), str(path))
    assert len(conversations) == 1
    assert problems == [f"{path}: record 1: the conversation is empty (field 'conversations' is []) (line 3)",
                        f"{path}: record 2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8 (line 4)"]
    with pytest.raises(UserError, match=r"record 1: the conversation is empty"):
        apply_map_fn(records, resolve_map_fn("sharegpt"), str(path))


def test_truncated_json_array_keeps_the_records_before_the_cut(tmp_path, tokenizer):
    """Like the public ShareGPT dump, which ends mid-record."""
    path = tmp_path / "cut.json"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_text("[\n" + ",\n".join([json.dumps(good)] * 3) + ',\n{"conversations": [{"from": "human", "val')
    with pytest.raises(UserError, match=r"cut.json: record 3: truncated JSON: the file ends inside this record "
                                        r"\(line 5\); fix the data, or set skip_bad_records=True"):
        build_sft_dataset(tokenizer, str(path), "sharegpt", use_cache=False)
    dataset = build_sft_dataset(tokenizer, str(path), "sharegpt", use_cache=False, skip_bad_records=True)
    assert len(dataset) == 3
