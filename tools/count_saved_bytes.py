"""What one Llama-2-7B-shape decoder layer saves for backward (its recompute's working set), counted on a CPU.

    python3 tools/count_saved_bytes.py --tokens 2048 [--tile 256] [--scale-to 262144]

Builds one decoder layer (hidden 4096, intermediate 11008, 32 heads) in bf16 with LoRA r=64, dropout 0.1 on
all 7 projections (bf16 norms: the residual stream that ``upcast_unquantized=False`` keeps), runs it
forward under bf16 autocast inside ``saved_tensors_hooks`` and sums the distinct storages it saves
(weights and the layer input excluded), then scales linearly to ``--scale-to`` tokens (everything a layer
saves is per token, sdpa included). A plain bf16 linear stands in for bitsandbytes' 4-bit one (both save
their input). On a CPU dropout saves its mask as a float tensor of the input's size; CUDA saves a bool
mask, so the GPU figure is smaller by 3 bytes per element of each LoRA input.
"""
from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from toolkit.model.tiled_mlp import tile_mlps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class OneLayer(torch.nn.Module):
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config):
        super().__init__()
        self.layer = LlamaDecoderLayer(config, 0)

    def forward(self, x, position_embeddings):
        return self.layer(x, position_embeddings=position_embeddings, attention_mask=None)


def saved_bytes(tokens: int, tile: int | None) -> tuple[int, list]:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=1, vocab_size=32000)
    config._attn_implementation = "sdpa"
    model = get_peft_model(OneLayer(config).to(torch.bfloat16),
                           LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS))
    if tile:
        tile_mlps(model.base_model.model, tile)
    x = torch.randn(1, tokens, 4096, dtype=torch.bfloat16, requires_grad=True)
    weights = {p.data_ptr() for p in model.parameters()} | {x.data_ptr()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in weights:
            storage = t.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(t.shape), t.dtype))
        return t
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rope = LlamaRotaryEmbedding(config)(x, torch.arange(tokens)[None])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, rope)
    rows = sorted(storages.values(), key=lambda row: -row[0])
    return sum(row[0] for row in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--tile", type=int, help="tiled MLP with this many tokens per tile")
    parser.add_argument("--scale-to", type=int, default=262144)
    args = parser.parse_args()
    total, rows = saved_bytes(args.tokens, args.tile)
    scale = args.scale_to / args.tokens
    print(f"{args.tokens} tokens, tile {args.tile}: {total / 2**20:.1f} MiB saved; "
          f"at {args.scale_to} tokens {total * scale / 2**30:.1f} GiB")
    for nbytes, shape, dtype in rows:
        if nbytes * scale >= 2**28:
            print(f"  {nbytes * scale / 2**30:6.2f} GiB  {list(shape)} {dtype} (shape at --tokens)")


if __name__ == "__main__":
    main()
