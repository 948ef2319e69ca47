import json
from pathlib import Path

import pytest

from toolkit import assets


def test_embedded_alias_is_a_complete_hf_folder(smollm2_dir):
    folder = Path(smollm2_dir)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()


def test_embedded_alias_reuses_the_cache(smollm2_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the cached model was converted again")
    monkeypatch.setattr(assets, "_convert_embedded", fail)
    assert assets.resolve_model_path("smollm2-135m-instruct") == smollm2_dir


def test_embedded_model_is_dense_and_answers(smollm2_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_other_paths_pass_through():
    assert assets.resolve_model_path("/some/local/folder") == "/some/local/folder"
    assert assets.resolve_model_path("internlm/internlm-chat-7b") == "internlm/internlm-chat-7b"


def test_wheel_download_reports_through_a_stderr_without_a_file(tmp_path, monkeypatch):
    """Where sys.stderr is no OS file (a notebook, captured test output) pip's output is passed on as text and a
    failed download is still one UserError; it was io.UnsupportedOperation from subprocess."""
    import io
    import sys
    from toolkit.assets import _download_wheel
    from toolkit.errors import UserError
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    missing = tmp_path / "no_such-0.1-py3-none-any.whl"  # a local file: pip fails without the network
    with pytest.raises(UserError, match="could not download"):
        _download_wheel(str(missing), tmp_path / "dest")
    assert "no_such-0.1-py3-none-any.whl" in stderr.getvalue()
