"""Safe loading: weights only through safetensors or ``torch.load(weights_only=True)``; a checkpoint that
carries pickled code is refused (and the code never runs) by convert and by resume; a model folder that
ships its own Python code is refused unless the config sets ``trust_remote_code=True``."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import torch

from toolkit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "smollm2_135m_instruct_lora_champ_e3"


def python_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_audit_every_torch_load_is_weights_only_and_nothing_unpickles():
    loads, problems = 0, []
    for path in python_files("toolkit"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("dill", "cloudpickle", "joblib") for n in names):
                    problems.append(f"{path}:{node.lineno}: imports a pickling library")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads", "Unpickler") \
                    and isinstance(node.value, ast.Name) and node.value.id in ("pickle", "_pickle"):
                problems.append(f"{path}:{node.lineno}: unpickles with pickle.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                loads += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    problems.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" \
                    and isinstance(node.value, ast.Constant) and node.value.value is True:
                problems.append(f"{path}:{node.lineno}: trust_remote_code=True")
    assert loads >= 1 and not problems, problems
    # a config may turn it on, in its settings where the user sees it: only InternLM's, whose model needs it
    trusting = {p.name for p in python_files("configs") if re.search(r"^trust_remote_code = True", p.read_text(), re.M)}
    assert trusting == {"internlm_chat_7b_qlora_math.py"}


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A .pth whose unpickling would create ``marker``: what a downloaded 'checkpoint' can do."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "iter_2.pth"
    torch.save({"meta": {"iter": 2, "epoch": 0}, "state_dict": {}, "payload": Payload()}, path)
    return path, marker


@pytest.fixture
def tiny_cfg(tmp_path, tiny_llama_dir) -> Path:
    assert main(["copy-cfg", SHIPPED, str(tmp_path)]) == 0
    path = tmp_path / f"{SHIPPED}_copy.py"
    text = path.read_text()
    for key, value in dict(pretrained_model_name_or_path=tiny_llama_dir, max_length=64, drop_long_samples=False,
                           val_size=0).items():
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value!r}  ", text, count=1, flags=re.M)
        assert n == 1
    path.write_text(text)
    return path


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("tk ")][-1]


def test_convert_refuses_a_checkpoint_with_pickled_code(evil_checkpoint, tiny_cfg, tmp_path, capsys):
    path, marker = evil_checkpoint
    assert main(["convert", "pth_to_hf", str(tiny_cfg), str(path), str(tmp_path / "out")]) == 2
    line = last_error_line(capsys)
    assert "not a loadable checkpoint (UnpicklingError" in line and str(path) in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_resume_refuses_a_checkpoint_with_pickled_code(evil_checkpoint, tiny_cfg, tmp_path, capsys):
    path, marker = evil_checkpoint
    assert main(["train", str(tiny_cfg), "--work-dir", str(tmp_path / "work"), "--resume", str(path),
                 "--cfg-options", "train_cfg.max_iters=2", "custom_hooks.1.evaluation_inputs=[]"]) == 2
    line = last_error_line(capsys)
    assert re.fullmatch(rf"tk train: error: {re.escape(str(path))}: not a loadable checkpoint \(UnpicklingError: .*\); "
                        r"resume from an iter_N.pth that tk train wrote", line), line
    assert not marker.exists()


def test_model_folder_with_its_own_code_is_refused_by_default(tmp_path, capsys, tiny_llama_dir):
    folder = tmp_path / "custom_model"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "config.json").write_text('{"model_type": "tk_custom_xyz", "architectures": ["XModel"], "auto_map": '
                                        '{"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}}')
    (folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    from toolkit.errors import UserError
    from toolkit.model.loader import load_causal_lm
    with pytest.raises(UserError, match="ships its own Python code, which tk does not run by default; if you trust "
                                        "it, set trust_remote_code=True"):
        load_causal_lm(str(folder))
    assert not marker.exists()
    # the CLI says it in one line too (merge loads the base first)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["convert", "merge", str(folder), str(adapter), str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "ships its own Python code" in last_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()
