"""LlavaFinetune on a tiny random llama + the real EfficientNet-Lite0: features land on the placeholders,
only trainable weights are saved, and a short training run lowers the loss."""
import pytest
import torch

from toolkit.multimodal.data import IMAGE_TOKEN_ID, build_image_dataset, image_collate_fn
from toolkit.multimodal.model import LlavaFinetune

SIZE = 64  # pixels: EfficientNet's 2x2 feature map, 4 tokens a picture

from mm_helpers import colour_data, image_folder  # noqa: F401  (fixtures)


@pytest.fixture
def model(tiny_llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return LlavaFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), image_size=SIZE,
                         adapter=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.fixture
def batch(tokenizer, colour_data):
    dataset = build_image_dataset(tokenizer, str(colour_data), image_size=SIZE, image_tokens=4)
    return image_collate_fn([dataset[i] for i in range(len(dataset))])


def test_the_encoder_is_the_pretrained_efficientnet_and_frozen(model):
    from toolkit.multimodal.encoders import embedded_encoder_path
    assert model.image_tokens == 4 and model.vision_encoder.out_channels == 1280
    weights = torch.load(embedded_encoder_path("efficientnet-lite0"), weights_only=True)
    loaded = model.vision_encoder.net.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    model.train()
    assert not model.vision_encoder.training  # batch-norm statistics stay as pretrained


def test_projected_pictures_replace_the_placeholders_in_order(model, batch):
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    slots = batch["input_ids"] == IMAGE_TOKEN_ID
    features = model.projector(model.vision_encoder(batch["pixel_values"]))
    assert torch.allclose(embeds[slots], features.reshape(-1, features.shape[-1]))
    text = model.llm.get_input_embeddings()(batch["input_ids"].masked_fill(slots, 0))
    assert torch.equal(embeds[~slots], text[~slots])


def test_a_placeholder_count_that_does_not_match_the_encoder_is_one_clear_error(model, batch):
    from toolkit.errors import UserError
    with pytest.raises(UserError, match="set image_tokens=4"):
        model.embed(batch["input_ids"], batch["pixel_values"][:-1])


def test_checkpoints_hold_only_the_projector_and_the_adapter(model):
    keys = list(model.state_dict())
    assert keys and all(k.startswith("projector.") or "lora_" in k for k in keys)
    assert any(k.startswith("projector.") for k in keys)


def test_training_lowers_the_loss(tiny_llama_dir, batch):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = LlavaFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), image_size=SIZE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_an_hf_vision_model_folder_serves_as_the_encoder(tmp_path, tiny_llama_dir, tokenizer, colour_data):
    """Any HF vision model (here a tiny random ViT saved with its image processor settings) plugs in;
    its patch tokens (+ CLS) are the picture's tokens."""
    import json

    from transformers import AutoModelForCausalLM, ViTConfig, ViTModel
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                           "image_std": [0.25] * 3}))
    model = LlavaFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), vision_encoder=str(tmp_path / "vit"),
                          image_size=32)
    assert model.image_tokens == 17 and model.vision_encoder.out_channels == 32
    assert model.vision_encoder.std.flatten().tolist() == [0.25] * 3
    dataset = build_image_dataset(tokenizer, str(colour_data), image_size=32, image_tokens=17)
    batch = image_collate_fn([dataset[0], dataset[1]])
    assert model(**batch)["loss"].requires_grad
