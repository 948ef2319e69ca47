"""User mistakes end with exit code 2 and one line on stderr, without a traceback."""
import subprocess
import sys

import pytest

from toolkit.cli.main import main


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_config(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.py")]) == 2
    err = one_line_error(capsys)
    assert "config file" in err and "does not exist" in err


@pytest.mark.parametrize("text, expected", [
    ("x = (\n", "syntax error in config"),
    ("from nonexistent_module_xyz import Foo\nmodel = dict(type=Foo)\n", "line 1: the config fails to load"),
    ("settings = {}\nlr = settings['lr']\n", "broken.py:2: the config fails to load: KeyError"),
])
def test_broken_config(capsys, tmp_path, text, expected):
    cfg = tmp_path / "broken.py"
    cfg.write_text(text)
    assert main(["train", str(cfg)]) == 2
    err = one_line_error(capsys)
    assert expected in err and "broken.py" in err


def test_unknown_template_and_missing_data(capsys, tmp_path):
    base = ["train", "smollm2_135m_instruct_lora_champ_e3", "--work-dir", str(tmp_path / "w"), "--cfg-options"]
    assert main(base + ["train_dataloader.dataset.template=chatmll"]) == 2
    assert "unknown prompt template 'chatmll'; choose one of:" in one_line_error(capsys)
    assert main(base + [f"train_dataloader.dataset.source={tmp_path}/none.json"]) == 2
    assert "none.json' does not exist" in one_line_error(capsys)
    assert not (tmp_path / "w").exists()


def test_checkpoint_that_is_not_one(capsys, tmp_path):
    fake = tmp_path / "iter_1.pth"
    fake.write_bytes(b"not a checkpoint")
    assert main(["convert", "pth_to_hf", "smollm2_135m_instruct_lora_champ_e3", str(fake), str(tmp_path / "o")]) == 2
    assert "not a loadable checkpoint" in one_line_error(capsys)


def test_merge_needs_an_adapter_folder(capsys, tmp_path):
    assert main(["convert", "merge", "smollm2-135m-instruct", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not an adapter folder" in one_line_error(capsys)


def test_console_script_propagates_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "toolkit.cli.main", "list-cfg"], capture_output=True, text=True)
    assert ok.returncode == 0 and "smollm2_135m_instruct_lora_champ_e3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "toolkit.cli.main", "copy-cfg", "no_such_cfg", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("tk copy-cfg: error: config 'no_such_cfg'")
    usage = subprocess.run([sys.executable, "-m", "toolkit.cli.main", "train"], capture_output=True, text=True)
    assert usage.returncode == 2 and "the following arguments are required: config" in usage.stderr
