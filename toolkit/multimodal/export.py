"""Multimodal folders: what ``tk convert pth_to_hf`` / ``merge`` write for a LlavaFinetune, and loading them.

A folder holds the LLM as tk writes any model (a peft adapter, or a full HF model, with the tokenizer
and ``tk_meta.json``), plus ``projector.safetensors``, ``vision_encoder.safetensors`` when the encoder
was trained, and ``tk_multimodal.json`` describing the composition::

    {"vision_encoder": "efficientnet-lite0", "image_size": 224, "image_tokens": 49,
     "projector": {"in_features": 1280, "out_features": 576, "depth": 2},
     "llm": "adapter" | "model" | "base", "base_model": "smollm2-135m-instruct", ...}

``llm: "base"`` (projector pre-training) means the LLM is the untouched base model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from mmengine.config import Config

from ..builder import build
from ..checkpoint import load_model_state
from ..errors import UserError
from ..outputs import staged_output

COMPOSITION_FILE = "tk_multimodal.json"
PROJECTOR_FILE = "projector.safetensors"
ENCODER_FILE = "vision_encoder.safetensors"


def is_multimodal_config(cfg: Config) -> bool:
    kind = cfg.model.get("type")
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    return name.split(".")[-1] == "LlavaFinetune"


def multimodal_folder(*folders):
    """The first of ``folders`` that tk wrote for a multimodal model, or None."""
    for folder in folders:
        if folder and (Path(folder) / COMPOSITION_FILE).is_file():
            return Path(folder)
    return None


def read_composition(folder) -> dict:
    return json.loads((Path(folder) / COMPOSITION_FILE).read_text(encoding="utf-8"))


def load_projector_weights(path) -> dict:
    """Projector weights from ``projector.safetensors`` (or a folder holding it) or a stage-1 ``.pth``."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise UserError(f"pretrained_projector {path} does not exist; give a stage-1 checkpoint or {PROJECTOR_FILE}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = load_model_state(path)
    weights = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    if not weights:
        raise UserError(f"{path} holds no projector weights (keys 'projector.*'); is it a multimodal checkpoint?")
    return weights


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.detach().contiguous() for k, v in state.items() if k.startswith(prefix)}


def pth_to_hf_multimodal(cfg: Config, checkpoint, out, force: bool = False) -> Path:
    """A training checkpoint of a LlavaFinetune config -> a folder that tk chat / merge load."""
    from safetensors.torch import save_file

    from ..model.export import chat_settings, load_trained_model
    from ..model.meta import write_meta
    model = load_trained_model(cfg, checkpoint)
    llm_trained = any(p.requires_grad for p in model.llm.parameters())
    kind = "adapter" if model.uses_adapter else "model" if llm_trained else "base"
    base = str(cfg.model.get("llm", {}).get("path", ""))
    full = model.state_dict()
    with staged_output(Path(out), force) as staging:
        if kind != "base":
            model.llm.save_pretrained(str(staging), safe_serialization=True)
        if "tokenizer" in cfg:
            build(cfg.tokenizer).save_pretrained(str(staging))
        save_file(_prefixed(full, "projector."), str(staging / PROJECTOR_FILE))
        if not model.freeze_vision:
            save_file(_prefixed(full, "vision_encoder."), str(staging / ENCODER_FILE))
        write_meta(staging, **chat_settings(cfg), base_model=base, kind=kind)
        composition = dict(vision_encoder=model.vision_encoder_name, image_size=model.image_size,
                           image_pool=model.image_pool, added_tokens=model.added_tokens,
                           image_tokens=model.image_tokens, projector=model.projector.settings, llm=kind,
                           base_model=base, vision_encoder_file=None if model.freeze_vision else ENCODER_FILE)
        (staging / COMPOSITION_FILE).write_text(json.dumps(composition, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def merge_multimodal(base: str, adapter, out, device: str = "auto", max_shard_size: str = "5GB", dtype="auto",
                     force: bool = False) -> Path:
    """``tk convert merge`` for a multimodal adapter folder: the LLM's adapter (and any new token rows)
    folded into its weights, the projector (and a trained encoder) copied beside it."""
    from ..model.loader import load_tokenizer
    from ..model.merge import check_merged, pick_device, probe_ids, probe_logits, tokenizer_source
    from ..model.meta import META_FILE
    from ..outputs import check_writable_output
    composition = read_composition(adapter)
    if composition["llm"] != "adapter":
        raise UserError(f"{adapter} holds no LLM adapter (llm: {composition['llm']!r}); there is nothing to merge: "
                        f"use the folder as it is")
    out = check_writable_output(out, force)
    device = pick_device(device)
    adapted = load_multimodal(base, adapter, dtype=dtype, device=device).llm
    tokenizer = load_tokenizer(tokenizer_source(base, adapter))
    probe = probe_ids(tokenizer, device)  # text only: merging changes the LLM, not the picture path
    unmerged = probe_logits(adapted, probe)
    merged = adapted.merge_and_unload()
    check_merged(unmerged, probe_logits(merged, probe), merged.get_input_embeddings().weight.dtype)
    with staged_output(out, force) as staging:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        for name in (PROJECTOR_FILE, ENCODER_FILE, META_FILE):
            if (Path(adapter) / name).is_file():
                shutil.copy(Path(adapter) / name, staging / name)
        composition.update(llm="model", base_model=str(base))
        (staging / COMPOSITION_FILE).write_text(json.dumps(composition, indent=2) + "\n", encoding="utf-8")
    return out


def load_multimodal(model: str, adapter=None, dtype="auto", device: str = "cpu"):
    """A LlavaFinetune ready to generate, from ``tk chat MODEL [--adapter DIR]`` arguments: MODEL is a
    multimodal folder (merged, full, or an adapter folder naming its base) or the base of ``adapter``."""
    from safetensors.torch import load_file

    from ..model.loader import load_causal_lm, load_tokenizer
    from ..model.merge import attach_adapter, check_adapter_folder
    from .model import LlavaFinetune
    from .tokens import add_token_rows
    folder = multimodal_folder(adapter, model)
    composition = read_composition(folder)
    base = model if adapter else composition.get("base_model") or model
    if composition["llm"] == "model":
        llm = load_causal_lm(str(folder), dtype=dtype).to(device)
    else:  # the base model, grown by the tokens training added, with the adapter on top
        llm = load_causal_lm(base, dtype=dtype).to(device)
        if composition.get("added_tokens"):
            add_token_rows(llm, load_tokenizer(str(folder)))
        if composition["llm"] == "adapter":
            check_adapter_folder(folder)
            llm = attach_adapter(llm, folder)
    mm = LlavaFinetune(llm, vision_encoder=composition["vision_encoder"], image_size=composition["image_size"],
                       image_pool=composition.get("image_pool"),
                       projector={"depth": composition["projector"]["depth"]})
    mm.projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    if composition.get("vision_encoder_file"):
        mm.vision_encoder.load_state_dict(load_file(str(folder / composition["vision_encoder_file"])))
    return mm.to(device).eval()
