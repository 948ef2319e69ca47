"""The bad-input table: every user mistake ends with a non-zero exit and ONE line on stderr that says what,
where (file, line, record index) and how to fix it; no traceback; nothing written or overwritten.

Each case builds its inputs in a fresh folder (the working directory of the run), snapshots that folder
(paths, sizes, mtimes), runs the real CLI entry (in-process, or as a true subprocess where marked) and
compares the snapshot after.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from toolkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "smollm2_135m_instruct_lora_champ_e3"
#: the "how to fix it" part of a message: an instruction after the what and the where
HINT = re.compile(r"(; |\(|: )(choose|fix|set|give|pass|remove|add|re-save|raise|point|see|write|rename|free|use|"
                  r"lower|leave|on a CPU|train without|reinstall|check)\b")
#: stderr lines that are not the error: progress bars (datasets, tqdm) and DeepSpeed's import-time notice
NOT_ERRORS = re.compile(r"\d+%\||examples/s\]|it/s\]|\[WARNING\] \[real_accelerator.py")


@dataclass
class Case:
    id: str
    setup: object                 # (Env) -> argv for `tk`
    expect: list                  # fragments the error line must hold (what and where)
    subprocess: bool = False
    marks: list = field(default_factory=list)


class Env:
    """The folder a case runs in, and helpers that write configs and data files into it."""

    def __init__(self, folder: Path, template: str, tiny_llama_dir: str):
        self.folder, self.template, self.model = folder, template, tiny_llama_dir

    def config(self, name="cfg.py", replace=(), **settings) -> str:
        """A copy of the shipped LoRA config on the tiny llama, PART 1 ``settings`` set, ``replace`` applied."""
        text = self.template
        for key, value in settings.items():
            text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value!r}  ", text, count=1, flags=re.M)
            assert n == 1, key
        for old, new in replace:
            assert old in text, old
            text = text.replace(old, new)
        (self.folder / name).write_text(text)
        return name

    def data(self, name: str, content) -> str:
        path = self.folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:  # records: JSON Lines
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
        return name

    def train(self, *extra, **settings) -> list:
        return ["train", self.config(**settings), "--work-dir", "work", *extra]

    def train_on(self, name, content, map_fn="alpaca", *extra, **settings) -> list:
        return self.train(*extra, data_source=self.data(name, content), dataset_map_fn=map_fn, **settings)

    def folder_with(self, name: str, files: dict) -> str:
        folder = self.folder / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        return name


def alpaca(n=3, **override):
    return [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}", **override} for i in range(n)]


def openai_turns(*turns):
    return {"messages": [dict(zip(("role", "content", "loss"), turn)) for turn in turns]}


BIG = 10 ** 9
CASES = [
    # ---- configs ---------------------------------------------------------------------------------------
    Case("config-syntax-error", lambda e: ["train", e.data("bad.py", "lr = 1\nx = (\n"), "--work-dir", "work"],
         ["bad.py:2", "syntax error in config"]),
    Case("config-import-fails", lambda e: ["train", e.data("bad.py", "import no_such_module_xyz\n")],
         ["bad.py, line 1", "the config fails to load", "no_such_module_xyz"]),
    Case("config-code-raises", lambda e: ["train", e.data("bad.py", "settings = {}\nlr = settings['lr']\n")],
         ["bad.py:2", "KeyError"]),
    Case("config-unknown-key", lambda e: e.train(replace=[("    drop_long_samples=drop_long_samples)",
                                                           "    drop_long_samples=drop_long_samples, max_lenght=9)")]),
         ["cfg.py:", "unknown setting 'max_lenght'", "max_length"]),
    Case("config-unknown-key-cli", lambda e: e.train("--cfg-options", "train_cfg.max_epoch=1"),
         ["cfg.py", "train_cfg has an unknown setting 'max_epoch'", "max_epochs"]),
    Case("config-wrong-type", lambda e: e.train(max_length="512"),
         ["cfg.py:", "max_length = '512' must be int", "not str"]),
    Case("config-wrong-type-lr", lambda e: e.train(lr="fast"), ["cfg.py:", "lr = 'fast' must be float"]),
    Case("config-wrong-type-adapter", lambda e: e.train(replace=[("r=16,", "r='16',")]),
         ["cfg.py:", "model.adapter.r = '16' must be int"]),
    Case("config-missing-required", lambda e: e.train(replace=[("\noptim_wrapper = dict(", "\noptim = dict(")]),
         ["cfg.py", "missing required setting(s) optim_wrapper"]),
    Case("config-missing-model-path", lambda e: e.train(pretrained_model_name_or_path=str(e.folder / "no_model")),
         ["cfg.py", "no_model", "model.llm"]),
    Case("config-model-path-not-hf-folder",
         lambda e: e.train(pretrained_model_name_or_path=str(e.folder / e.folder_with("m", {"x.txt": "x"}))),
         ["cfg.py", "not an HF model folder (no config.json)"]),
    Case("config-unknown-template", lambda e: e.train(prompt_template="chatmll"),
         ["unknown prompt template 'chatmll'", "chatml"]),
    Case("config-unknown-map-fn", lambda e: e.train(dataset_map_fn="alpacca"),
         ["unknown dataset map fn 'alpacca'", "alpaca"]),
    Case("config-unknown-adapter-type", lambda e: e.train(replace=[("type=LoraConfig,", "type='lorax',")]),
         ["cfg.py", "unknown adapter type 'lorax'"]),
    Case("config-conflict-deepspeed-and-fsdp", lambda e: e.train("--deepspeed", "zero2", "--strategy", "fsdp"),
         ["--deepspeed and --strategy fsdp exclude each other"]),
    Case("config-conflict-qlora-on-cpu", lambda e: e.train(replace=[(
        "dtype='float32')", "dtype='float32', quantization_config=dict(type=BitsAndBytesConfig, load_in_4bit=True))"),
        ("from peft import LoraConfig", "from peft import LoraConfig\nfrom transformers import BitsAndBytesConfig")]),
         ["cfg.py", "quantization_config", "needs a CUDA GPU"],
         marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is valid where CUDA is")]),
    Case("config-conflict-val-size", lambda e: e.train(val_size=10_000),
         ["val_size=10000 leaves no training data"]),
    Case("config-unknown-deepspeed-preset", lambda e: e.train("--deepspeed", "zero9"), ["--deepspeed zero9"]),
    # ---- data --------------------------------------------------------------------------------------------
    Case("data-missing-field", lambda e: e.train_on("d.jsonl", alpaca(2) + [{"instruction": "Hi"}]),
         ["d.jsonl: record 2: missing field 'output'", "line 3", "skip_bad_records"]),
    Case("data-wrong-type", lambda e: e.train_on("d.jsonl", alpaca(2, output=7)),
         ["d.jsonl: record 0: field 'output' must be a string, got int", "line 1"]),
    Case("data-invalid-json", lambda e: e.train_on("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instr\n'
                                                               '{"instruction": "c", "output": "d"}\n'),
         ["d.jsonl: record 1: not valid JSON", "line 2"]),
    Case("data-truncated-file", lambda e: e.train_on("d.json", json.dumps(alpaca(3))[:-30]),
         ["d.json: record 2: truncated JSON", "line 1"]),
    Case("data-empty-file", lambda e: e.train_on("d.jsonl", b""), ["d.jsonl", "the data file is empty"]),
    Case("data-empty-list", lambda e: e.train_on("d.json", "[]"), ["d.json", "holds no records"]),
    Case("data-non-utf8", lambda e: e.train_on("d.jsonl", json.dumps(alpaca(1)[0]).encode() + b"\n"
                                               + '{"instruction": "caf\u00e9", "output": "x"}\n'.encode("latin-1")),
         ["d.jsonl: record 1: not valid UTF-8 (byte 0xe9)", "line 2", "re-save"]),
    Case("data-record-not-object", lambda e: e.train_on("d.jsonl", alpaca(1) + [[1, 2]]),
         ["d.jsonl: record 1: a record must be an object, got list", "line 2"]),
    Case("data-zero-trainable-tokens",
         lambda e: e.train_on("d.jsonl", [openai_turns(("user", "hi"), ("assistant", "yo", False))] * 4, "openai"),
         ["d.jsonl: all 4 samples were dropped (no trained token", "max_length"]),
    Case("data-all-samples-too-long", lambda e: e.train_on("d.jsonl", alpaca(4), max_length=8, drop_long_samples=True),
         ["d.jsonl: all 4 samples were dropped", "max_length=8"]),
    Case("data-no-assistant", lambda e: e.train_on("d.jsonl", [openai_turns(("user", "hi"))], "openai"),
         ["d.jsonl: record 0: the conversation has no assistant message", "line 1"]),
    Case("data-unknown-role", lambda e: e.train_on("d.jsonl", [openai_turns(("human", "hi"), ("assistant", "x"))],
                                                   "openai"),
         ["d.jsonl: record 0: message 0 has role 'human'", "line 1"]),
    Case("data-sharegpt-unknown-speaker",
         lambda e: e.train_on("d.json", json.dumps([{"conversations": [{"from": "bot", "value": "x"}]}]), "sharegpt"),
         ["d.json: record 0: turn 0 has 'from': 'bot'"]),
    Case("data-csv-missing-column", lambda e: e.train_on("d.csv", "instruction,input\nhi,\n"),
         ["d.csv: record 0: missing field 'output'", "row 1"]),
    Case("data-yaml-invalid", lambda e: e.train_on("d.yml", "conversations:\n- - a\n  - [b\n", "chatterbot"),
         ["d.yml:", "not valid YAML"]),
    Case("data-missing-file", lambda e: e.train(data_source="nope.jsonl"), ["cfg.py", "'nope.jsonl' does not exist"]),
    Case("data-unsupported-file-type", lambda e: e.train_on("d.xml", "<a/>"), ["d.xml", "unsupported data file type"]),
    # ---- command line -------------------------------------------------------------------------------------
    Case("cli-missing-argument", lambda e: ["train"],
         ["tk train: error: the following arguments are required: config", "tk train -h"], subprocess=True),
    Case("cli-unknown-command", lambda e: ["trian", "x.py"], ["invalid choice: 'trian'"], subprocess=True),
    Case("cli-bad-cfg-options", lambda e: e.train("--cfg-options", "max_length"), ["'max_length': write KEY=VALUE"]),
    Case("cli-bad-cfg-options-check-dataset", lambda e: ["check-custom-dataset", e.config(), "--cfg-options", "x"],
         ["tk check-custom-dataset: error: --cfg-options 'x': write KEY=VALUE"]),
    Case("cli-config-path-does-not-exist", lambda e: ["train", "nope/cfg.py"], ["config file nope/cfg.py does not exist"]),
    Case("cli-unknown-shipped-config", lambda e: ["train", "no_such_cfg"], ["config 'no_such_cfg'", "tk list-cfg"]),
    Case("cli-resume-missing-checkpoint", lambda e: e.train("--resume", "work/iter_9.pth"),
         ["--resume work/iter_9.pth: no such checkpoint"]),
    Case("cli-work-dir-is-a-file", lambda e: ["train", e.config(), "--work-dir", e.data("taken", "x")],
         ["work dir taken is not writable", "--work-dir"]),
    Case("cli-work-dir-unwritable", lambda e: ["train", e.config(), "--work-dir", "/proc/tk-work"],
         ["work dir /proc/tk-work is not writable"], subprocess=True),
    Case("cli-pth-to-hf-missing-checkpoint", lambda e: ["convert", "pth_to_hf", e.config(), "iter_5.pth", "out"],
         ["checkpoint iter_5.pth does not exist"]),
    Case("cli-pth-to-hf-not-a-checkpoint",
         lambda e: ["convert", "pth_to_hf", e.config(), e.data("iter_5.pth", b"PK\x03\x04junk"), "out"],
         ["iter_5.pth: not a loadable checkpoint"]),
    Case("cli-pth-to-hf-existing-output",
         lambda e: ["convert", "pth_to_hf", e.config(), e.data("iter_5.pth", b"x"), e.folder_with("out", {"a": "1"})],
         ["output folder out is not empty", "--force"]),
    Case("cli-merge-existing-output",
         lambda e: ["convert", "merge", e.model, e.folder_with("ad", {"adapter_config.json": "{}"}),
                    e.folder_with("out", {"keep.txt": "mine"})],
         ["output folder out is not empty", "--force"], subprocess=True),
    Case("cli-merge-not-an-adapter", lambda e: ["convert", "merge", e.model, e.folder_with("ad", {"x": "1"}), "out"],
         ["ad is not an adapter folder (no adapter_config.json)"]),
    Case("cli-merge-missing-base",
         lambda e: ["convert", "merge", "./no_base", e.folder_with("ad", {"adapter_config.json": "{}"}), "out"],
         ["model path './no_base'"]),
    Case("cli-merge-bad-dtype",
         lambda e: ["convert", "merge", e.model, e.folder_with("ad", {"adapter_config.json": "{}"}), "out",
                    "--dtype", "float8"], ["unknown dtype 'float8'"]),
    Case("cli-copy-cfg-existing-copy", lambda e: ["copy-cfg", SHIPPED, e.folder_with("c", {f"{SHIPPED}_copy.py": "x"})],
         [f"{SHIPPED}_copy.py already exists"]),
]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_llama_dir) -> str:
    """The shipped LoRA config's text on the tiny llama: short samples, no validation, no chat samples."""
    folder = tmp_path_factory.mktemp("shipped")
    assert main(["copy-cfg", SHIPPED, str(folder)]) == 0
    text = (folder / f"{SHIPPED}_copy.py").read_text()
    for key, value in dict(pretrained_model_name_or_path=tiny_llama_dir, max_length=64, drop_long_samples=False,
                           val_size=0).items():
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value!r}  ", text, count=1, flags=re.M)
        assert n == 1, key
    return re.sub(r"^evaluation_inputs = \[.*?\]", "evaluation_inputs = []", text, count=1, flags=re.M | re.S)


def run_tk(case: Case, argv: list, capsys) -> tuple[int, str]:
    if case.subprocess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-m", "toolkit.cli.main", *argv], capture_output=True, text=True,
                              env=env)
        return done.returncode, done.stderr
    from mmengine.logging import MMLogger
    MMLogger.get_instance(f"bad-input-{case.id}")  # log to this test's stdout, not an earlier test's (closed)
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, template, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path, template, tiny_llama_dir)
    argv = case.setup(env)
    before = snapshot(tmp_path)
    try:
        code, err = run_tk(case, argv, capsys)
    except SystemExit as exc:  # argparse in-process
        code, err = exc.code, capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not NOT_ERRORS.search(line)]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert re.match(r"tk[ :]", line), line
    for fragment in case.expect:
        assert fragment in line, (fragment, line)
    assert HINT.search(line), f"no fix hint in: {line}"
    assert snapshot(tmp_path) == before, "the failed command wrote or changed files"


def test_the_table_is_big_enough():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and kinds == {"config", "data", "cli"}
    assert sum(c.subprocess for c in CASES) >= 3
