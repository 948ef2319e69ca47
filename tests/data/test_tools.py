"""tk list-dataset-format, tk check-custom-dataset CFG, tk log-dataset CFG --show ..."""
import json
import re

from toolkit.cli.main import main

CONFIG = "smollm2_135m_instruct_lora_champ_e3"


def test_list_dataset_format(capsys):
    assert main(["list-dataset-format"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(["alpaca", "champ", "chatterbot", "conversation", "math", "openai", "sharegpt", "text"])
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # a description each


def test_check_custom_dataset_lists_every_bad_record(tmp_path, capsys, smollm2_dir):
    data = tmp_path / "mine.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"output": "b"}\n{"instruction": "a", "output": 3}\n'
                     b'{"instruction": "caf\xe9", "output": "b"}\n{"instruction": "a", "output": "b"}\n'
                     b'{"instruction": "a", "outp')
    options = ["--cfg-options", f"train_dataloader.dataset.source={data}", "train_dataloader.dataset.map_fn=alpaca"]
    assert main(["check-custom-dataset", CONFIG] + options) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        f"{data}: record 1: missing field 'instruction' (line 2)",
        f"{data}: record 2: field 'output' must be a string, got int (line 3)",
        f"{data}: record 3: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8 (line 4)",
        f"{data}: record 5: truncated JSON: the file ends inside this record (line 6)"]
    assert out[-1] == "6 records, 2 good, 4 bad"

    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a" * 5000}) + "\n" for i in range(3)))
    assert main(["check-custom-dataset", CONFIG] + options) == 0
    out = capsys.readouterr().out
    assert "note: 3 samples are longer than max_length=320 (dropped)" in out and "3 records, 3 good, 0 bad" in out


def test_log_dataset_marks_what_is_not_trained(tmp_path, capsys, smollm2_dir):
    data = tmp_path / "one.jsonl"
    data.write_text((json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n") * 20)  # some may be held out
    options = ["--cfg-options", f"train_dataloader.dataset.source={data}", "train_dataloader.dataset.map_fn=alpaca"]
    assert main(["log-dataset", CONFIG, "--show", "all"] + options) == 0
    out = capsys.readouterr().out
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert (f"[no loss]<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n"
            f"<|im_start|>assistant\n[/no loss]hi<|im_end|>[no loss]\n[/no loss]") in out
    assert "input_ids: [1, 9690, 198" in out and "labels: [-100, -100" in out
    assert main(["log-dataset", CONFIG, "--show", "labels", "--index", "50"] + options) == 2
    assert re.search(r"--index 50 is outside the dataset's \d+ samples", capsys.readouterr().err)
