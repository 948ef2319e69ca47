"""``tk convert pth_to_hf``: a training checkpoint -> an HF adapter folder (or a full HF model folder)."""
from __future__ import annotations

from pathlib import Path

from mmengine.config import Config
from mmengine.registry import MODELS

from ..builder import build
from ..checkpoint import load_model_state
from ..errors import UserError
from ..outputs import check_writable_output, staged_output
from .adapters.quantum import is_adapter_model, save_adapter
from .meta import write_meta


def chat_settings(cfg: Config) -> dict:
    """What chat needs to talk like training did: template and system prompt from the config's dataset."""
    dataset = cfg.train_dataloader.get("dataset", {})
    return {"template": dataset.get("template", cfg.get("prompt_template")),
            "system": dataset.get("system", cfg.get("system"))}


def load_trained_model(cfg: Config, checkpoint):
    """The config's model with a training checkpoint's weights (a ``.pth``, or a --deepspeed run's folder
    of ZeRO partitions); one line if the checkpoint does not belong to the config."""
    if Path(checkpoint).is_dir():
        from ..engine.strategy import load_zero_checkpoint
        state = load_zero_checkpoint(checkpoint)
    else:
        state = load_model_state(checkpoint)
    # Built exactly as the runner builds it: one level (the model builds its llm and applies its adapter
    # itself), a class or, in a config mmengine dumped, its import path.
    model = MODELS.build(cfg.model)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise UserError(f"{checkpoint}: {len(result.unexpected_keys)} weights do not belong to the model that "
                        f"the config builds (e.g. {result.unexpected_keys[0]}); use the config it was trained with")
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UserError(f"{checkpoint}: the checkpoint lacks {len(missing)} trained weights "
                        f"(e.g. {sorted(missing)[0]}); is it from this config?")
    return model


def pth_to_hf(cfg: Config, checkpoint, out, force: bool = False) -> Path:
    check_writable_output(out, force)  # before any weights load
    model = load_trained_model(cfg, checkpoint)
    tokenizer = build(cfg.tokenizer) if "tokenizer" in cfg else None
    with staged_output(Path(out), force) as staging:
        if is_adapter_model(model.llm):  # tk's circuit adapters: their own folder format
            save_adapter(model.llm, staging)
        else:
            model.llm.save_pretrained(str(staging), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        llm_cfg = cfg.model.get("llm", {})
        write_meta(staging, **chat_settings(cfg), base_model=str(llm_cfg.get("path", "")),
                   kind="adapter" if model.uses_adapter else "model")
    return Path(out)
