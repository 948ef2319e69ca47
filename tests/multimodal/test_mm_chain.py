"""The multimodal path a user walks, on a tiny random llama + the real EfficientNet-Lite0 and real PNGs:
copy-cfg -> edit -> tk train (loss falls) -> pth_to_hf -> same logits -> merge -> same logits -> tk chat --image."""
import io
import json

import pytest
import torch
from mmengine.registry import MODELS

from toolkit.checkpoint import load_model_state
from toolkit.cli.main import main
from toolkit.config import load_config
from toolkit.multimodal.data import build_image_dataset, image_collate_fn
from toolkit.multimodal.export import COMPOSITION_FILE, PROJECTOR_FILE, load_multimodal

from cfg_edit import edit_config

CONFIG = "smollm2_135m_instruct_llava_lora_emoji"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    from PIL import Image
    from mm_helpers import COLOURS, ask, write_jsonl
    root = tmp_path_factory.mktemp("mm_chain")
    (root / "data" / "img").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(root / "data" / "img" / f"{name}.png")
    data = write_jsonl(root / "data" / "colours.jsonl", [ask(f"img/{n}.png", answer=n) for n in COLOURS] * 4)
    assert main(["copy-cfg", CONFIG, str(root)]) == 0
    cfg = root / f"{CONFIG}_copy.py"
    edit_config(cfg, pretrained_model_name_or_path=tiny_llama_dir, data_source=str(data), image_size=64,
                image_tokens=4, batch_size=4, max_iters=6, lr=1e-2, save_steps=6, logging_steps=1)
    work_dir = root / "work"
    assert main(["train", str(cfg), "--work-dir", str(work_dir)]) == 0
    return root, cfg, work_dir, data


def logits(model, batch):
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def test_train_lowers_the_loss_and_saves_projector_and_adapter_only(trained):
    _, _, work_dir, _ = trained
    scalars = next(work_dir.rglob("vis_data/scalars.json")).read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in scalars if '"loss"' in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    log = next(work_dir.rglob("*/*.log")).read_text()
    assert "(1 pictures)" in log and "Picture 1: <img>[image: 4 tokens]</img>" in log  # the dataset-info hook
    state = load_model_state(work_dir / "iter_6.pth")
    assert {k.split(".")[0] for k in state} == {"projector", "llm"}
    assert all("lora_" in k for k in state if k.startswith("llm."))


def test_pth_to_hf_and_merge_load_again_with_the_same_logits(trained, tiny_llama_dir, tokenizer, capsys):
    root, cfg, work_dir, data = trained
    adapter, merged = root / "adapter", root / "merged"
    assert main(["convert", "pth_to_hf", str(cfg), str(work_dir / "iter_6.pth"), str(adapter)]) == 0
    written = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", PROJECTOR_FILE, COMPOSITION_FILE, "tk_meta.json"} <= written
    composition = json.loads((adapter / COMPOSITION_FILE).read_text())
    assert composition["llm"] == "adapter" and composition["image_tokens"] == 4
    model = MODELS.build(load_config(str(cfg)).model)
    model.load_state_dict(load_model_state(work_dir / "iter_6.pth"), strict=False)
    model.eval()
    dataset = build_image_dataset(tokenizer, str(data), image_size=64, image_tokens=4)
    batch = image_collate_fn([dataset[0], dataset[1]])
    expected = logits(model, batch)
    assert torch.allclose(logits(load_multimodal(tiny_llama_dir, str(adapter)), batch), expected, atol=1e-5)
    assert main(["convert", "merge", tiny_llama_dir, str(adapter), str(merged), "--device", "cpu"]) == 0
    assert "merge check: max |merged - unmerged| logit difference" in capsys.readouterr().out
    assert json.loads((merged / COMPOSITION_FILE).read_text())["llm"] == "model"
    assert torch.allclose(logits(load_multimodal(str(merged)), batch), expected, atol=1e-4)


def test_chat_with_an_image_and_a_clear_error_for_a_missing_one(trained, tiny_llama_dir, capsys, monkeypatch):
    root, *_ = trained
    adapter = root / "adapter"
    picture = root / "data" / "img" / "red.png"
    monkeypatch.setattr("sys.stdin", io.StringIO("What colour is it?\n<img>nowhere.png</img> and this?\n"))
    assert main(["chat", tiny_llama_dir, "--adapter", str(adapter), "--image", str(picture),
                 "--max-new-tokens", "3", "--no-streamer"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1  # a reply to the first message; the second one names a missing picture
    assert "tk chat: image 'nowhere.png' not found" in err
    assert main(["chat", tiny_llama_dir, "--image", str(root / "gone.png")]) == 2
    assert "--image" in capsys.readouterr().err


def test_log_dataset_shows_the_pictures_as_placeholders(trained, capsys):
    _, cfg, _, _ = trained
    assert main(["log-dataset", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[no loss]<|im_start|>user\nPicture 1: <img>[image: 4 tokens]</img>\nWhat colour is it?" in out
