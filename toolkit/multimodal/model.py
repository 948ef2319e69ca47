"""LLaVA-style model for tk train: vision encoder -> MLP projector -> the causal LM's input embeddings.

The image placeholders in ``input_ids`` (``IMAGE_TOKEN_ID``) are replaced, in order, by the projected
image tokens of ``pixel_values``. The LLM is trained in full, with an adapter (LoRA, QLoRA: a peft config
on a 4-bit ``llm``) or frozen (projector pre-training); the projector always trains; the vision encoder is
frozen unless ``freeze_vision=False``. Checkpoints hold only the trainable weights.
"""
from __future__ import annotations

import torch
from mmengine.registry import MODELS
from torch import nn

from ..builder import build
from ..errors import UserError
from ..model.loss import causal_lm_loss
from ..model.sft import SupervisedFinetune
from .data import IMAGE_TOKEN_ID
from .encoders import build_vision_encoder
from .tokens import add_token_rows, with_trainable_tokens


class MLPProjector(nn.Sequential):
    """LayerNorm + ``depth`` Linear layers with GELU between (LLaVA-1.5's mlp2x_gelu when depth=2)."""

    def __init__(self, in_features: int, out_features: int, depth: int = 2):
        layers = [nn.LayerNorm(in_features), nn.Linear(in_features, out_features)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features)]
        super().__init__(*layers)
        self.settings = dict(in_features=in_features, out_features=out_features, depth=depth)


@MODELS.register_module()
class LlavaFinetune(SupervisedFinetune):
    """``llm`` + ``adapter`` as in SupervisedFinetune, plus ``vision_encoder`` (``efficientnet-lite0`` or an
    HF folder) and an MLP ``projector`` (dict of MLPProjector settings: ``depth``). ``image_pool``: average
    a convolutional encoder's feature map down to ``image_pool`` x ``image_pool`` tokens per picture.

    ``freeze_llm``: train the projector alone (stage 1, captions). ``pretrained_projector``: a stage-1
    checkpoint (``.pth``) or ``projector.safetensors`` to start the projector from. ``tokenizer``: the
    config's tokenizer; when it adds tokens (tokens.py) the LLM's embeddings grow and their new rows train.
    """

    def __init__(self, llm, vision_encoder="efficientnet-lite0", image_size: int = 224, image_pool=None, projector=None,
                 adapter=None, freeze_vision: bool = True, freeze_llm: bool = False, pretrained_projector=None,
                 tokenizer=None, gradient_checkpointing: bool = False, data_preprocessor=None):
        if freeze_llm and adapter is not None:
            raise UserError("freeze_llm=True trains the projector alone: remove the adapter (or set freeze_llm=False)")
        llm = build(llm) if isinstance(llm, dict) else llm
        new_ids = add_token_rows(llm, tokenizer)  # a tokenizer with special_tokens added
        with torch.no_grad():  # the embedding width, also through peft's wrappers
            width = llm.get_input_embeddings()(torch.zeros(1, 1, dtype=torch.long)).shape[-1]
        if new_ids and adapter is not None:
            adapter = with_trainable_tokens(adapter, llm, new_ids)
        super().__init__(llm, adapter=adapter, gradient_checkpointing=gradient_checkpointing,
                         data_preprocessor=data_preprocessor)
        self.added_tokens = len(new_ids)
        if freeze_llm:
            self.llm.requires_grad_(False)
            for layer in (self.llm.get_input_embeddings(), self.llm.get_output_embeddings()) if new_ids else ():
                layer.requires_grad_(True)  # new tokens must learn their embeddings (and LM-head rows)
        self.vision_encoder_name = str(vision_encoder)
        self.vision_encoder = build_vision_encoder(vision_encoder, image_pool) if isinstance(vision_encoder, str) \
            else vision_encoder
        self.image_pool = image_pool
        self.freeze_vision, self.image_size = freeze_vision, image_size
        with torch.no_grad():  # tokens per picture: what the data's image_tokens must be
            self.image_tokens = self.vision_encoder.eval()(torch.zeros(1, 3, image_size, image_size)).shape[1]
        self.vision_encoder.requires_grad_(not freeze_vision)
        self.projector = MLPProjector(self.vision_encoder.out_channels, width, **(projector or {}))
        if pretrained_projector:
            from .export import load_projector_weights
            self.projector.load_state_dict(load_projector_weights(pretrained_projector))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:
            self.vision_encoder.eval()  # frozen batch-norm statistics stay as trained
        return self

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The trainable weights only (a full fine-tune: the LLM and the projector, not a frozen encoder),
        with a trained encoder's batch-norm statistics."""
        full = nn.Module.state_dict(self, *args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        vision = prefix + "vision_encoder."
        return type(full)((k, v) for k, v in full.items()
                          if k in keep or (not self.freeze_vision and k.startswith(vision)))

    def embed(self, input_ids, pixel_values=None) -> torch.Tensor:
        """Input embeddings with each picture's projected tokens in the place of its placeholders."""
        slots = input_ids == IMAGE_TOKEN_ID
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        count = 0 if pixel_values is None else len(pixel_values)
        if count == 0:
            if bool(slots.any()):
                raise UserError("the input has image placeholders but no pictures (pixel_values)")
            return embeds
        tokens = self.vision_encoder(pixel_values.to(embeds.device))
        features = self.projector(tokens.to(self.projector[0].weight.dtype))
        if features.shape[0] * features.shape[1] != int(slots.sum()):
            raise UserError(f"{count} pictures give {features.shape[1]} tokens each, but the text has "
                            f"{int(slots.sum())} image placeholders: set image_tokens={features.shape[1]} "
                            f"for the dataset in the config")
        return embeds.masked_scatter(slots[..., None], features.to(embeds.dtype))

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, pixel_values=None,
                mode: str = "loss"):
        if mode != "loss":
            raise NotImplementedError(f"LlavaFinetune only computes the training loss (mode={mode!r})")
        if position_ids is not None:
            raise UserError("packed samples are not supported with pictures; set pack_to_max_length=False")
        return {"loss": causal_lm_loss(self.llm, None, labels, attention_mask,
                                       inputs_embeds=self.embed(input_ids, pixel_values))}

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, pad_token_id=None, **kwargs):
        """``llm.generate`` from the merged embeddings; returns the prompt ids (placeholders as the pad id)
        followed by the new ones, like a text model's ``generate``."""
        embeds = self.embed(input_ids, pixel_values)
        shown = input_ids.masked_fill(input_ids == IMAGE_TOKEN_ID, pad_token_id or 0)
        return self.llm.generate(input_ids=shown, inputs_embeds=embeds, pad_token_id=pad_token_id, **kwargs)
