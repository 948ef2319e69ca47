"""<ref>/<box> as new tokens: single ids, trainable embedding and LM-head rows, and a converted folder
(adapter, then merged) that loads again with the same logits."""
import torch
from mmengine.config import Config
from peft import LoraConfig

from toolkit.model.loader import load_causal_lm
from toolkit.multimodal.data import build_image_dataset, image_collate_fn
from toolkit.multimodal.export import load_multimodal, merge_multimodal, pth_to_hf_multimodal
from toolkit.multimodal.model import LlavaFinetune
from toolkit.multimodal.tokens import GROUNDING_TOKENS, load_tokenizer_with_tokens

from mm_helpers import write_jsonl
from mm_helpers import image_folder  # noqa: F401  (fixtures)


def test_grounding_tags_become_new_trainable_tokens_that_survive_convert_and_merge(tmp_path, tiny_llama_dir,
                                                                                   image_folder):
    tokenizer_cfg = dict(type=load_tokenizer_with_tokens, path=tiny_llama_dir, special_tokens=GROUNDING_TOKENS)
    tokenizer = load_tokenizer_with_tokens(tiny_llama_dir, GROUNDING_TOKENS)
    old = len(tokenizer) - len(GROUNDING_TOKENS)
    new_ids = tokenizer.convert_tokens_to_ids(GROUNDING_TOKENS)
    assert new_ids == list(range(old, len(tokenizer)))
    text = "<ref>a red square</ref><box>(0,0),(999,999)</box>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= old] == new_ids[:4] and tokenizer.decode(ids) == text

    cfg = Config(dict(
        tokenizer=tokenizer_cfg,
        model=dict(type=LlavaFinetune, llm=dict(type=load_causal_lm, path=tiny_llama_dir), tokenizer=tokenizer_cfg,
                   image_size=64, adapter=dict(type=LoraConfig, r=4, target_modules=["q_proj", "v_proj"])),
        train_dataloader=dict(dataset=dict(template="chatml"))))
    torch.manual_seed(0)
    model = LlavaFinetune(**{k: v for k, v in cfg.model.items() if k != "type"})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.token_adapter" in n for n in trainable)
    assert any("lm_head.token_adapter" in n for n in trainable)  # the tiny llama's head is not tied
    embeddings = model.llm.get_base_model().get_input_embeddings().weight
    assert torch.allclose(embeddings[old], embeddings[:old].mean(0))  # the same start at every load
    with torch.no_grad():  # as if trained: the new rows, LoRA and projector all move
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "iter_1.pth")

    source = write_jsonl(image_folder / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "Picture 1: <img>img/red.png</img>\nWhere is the red square?"},
        {"from": "gpt", "value": text}]}])
    batch = image_collate_fn([build_image_dataset(tokenizer, str(source), image_size=64, image_tokens=4)[0]])
    assert sum(int((batch["input_ids"] == i).sum()) for i in new_ids) == 4

    def logits(mm):
        with torch.no_grad():
            return mm.eval().llm(inputs_embeds=mm.embed(batch["input_ids"], batch["pixel_values"])).logits

    expected = logits(model)
    adapter = pth_to_hf_multimodal(cfg, tmp_path / "iter_1.pth", tmp_path / "adapter")
    assert torch.allclose(logits(load_multimodal(str(adapter))), expected, atol=1e-5)
    merged = merge_multimodal(tiny_llama_dir, str(adapter), tmp_path / "merged", device="cpu")
    assert torch.allclose(logits(load_multimodal(str(merged))), expected, atol=1e-4)
