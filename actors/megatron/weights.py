"""Hugging Face Llama weights -> a megatron-core GPTModel shard (local spec), rank by rank.

Each rank reads only the HF tensors it needs and copies its own shard; no collectives.

| HF                                   | GPTModel (local spec)                      | TP split            |
|--------------------------------------|--------------------------------------------|---------------------|
| model.embed_tokens                   | embedding.word_embeddings (first stage)    | rows (vocab)        |
| layers.i.input_layernorm             | decoder.layers.j.input_layernorm           | replicated          |
| q_proj, k_proj, v_proj               | ...self_attention.linear_qkv               | by query groups     |
| o_proj                               | ...self_attention.linear_proj              | columns             |
| post_attention_layernorm             | ...pre_mlp_layernorm                       | replicated          |
| gate_proj, up_proj                   | ...mlp.linear_fc1: [gate_r; up_r]          | each by rows        |
| down_proj                            | ...mlp.linear_fc2                          | columns             |
| model.norm                           | decoder.final_layernorm (last stage)       | replicated          |
| lm_head (or embed_tokens if tied)    | output_layer (last stage)                  | rows (vocab)        |

QKV layout (GQA): per KV group its NH/NKV query heads, then its K head, then its V head.
Layer j is local to a pipeline stage; its global index is `layer.layer_number - 1`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

HFTensor = Callable[[str], torch.Tensor]  # HF parameter name -> full tensor


def qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF q/k/v (rows = output features) in megatron's per-query-group interleaved order."""
    hidden = q.shape[1:]
    head_dim = k.shape[0] // groups
    q = q.reshape(groups, heads // groups * head_dim, *hidden)
    k = k.reshape(groups, head_dim, *hidden)
    v = v.reshape(groups, head_dim, *hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, *hidden)


def shard_for(name: str, hf: HFTensor, layer_of: Callable[[int], int], cfg, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's shard of GPTModel parameter `name`, taken from the HF checkpoint."""
    if name == "embedding.word_embeddings.weight":
        return hf("model.embed_tokens.weight").chunk(tp)[tp_rank]
    if name == "decoder.final_layernorm.weight":
        return hf("model.norm.weight")
    if name == "output_layer.weight":
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        return hf(head).chunk(tp)[tp_rank]
    _, _, local, *rest = name.split(".")
    prefix = f"model.layers.{layer_of(int(local))}."
    leaf = ".".join(rest)
    if leaf == "input_layernorm.weight":
        return hf(prefix + "input_layernorm.weight")
    if leaf == "pre_mlp_layernorm.weight":
        return hf(prefix + "post_attention_layernorm.weight")
    if leaf == "self_attention.linear_qkv.weight":
        attn = prefix + "self_attn."
        rows = qkv_rows(
            hf(attn + "q_proj.weight"),
            hf(attn + "k_proj.weight"),
            hf(attn + "v_proj.weight"),
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
        )
        return rows.chunk(tp)[tp_rank]
    if leaf == "self_attention.linear_proj.weight":
        return hf(prefix + "self_attn.o_proj.weight").chunk(tp, dim=1)[tp_rank]
    if leaf == "mlp.linear_fc1.weight":
        gate, up = hf(prefix + "mlp.gate_proj.weight"), hf(prefix + "mlp.up_proj.weight")
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
    if leaf == "mlp.linear_fc2.weight":
        return hf(prefix + "mlp.down_proj.weight").chunk(tp, dim=1)[tp_rank]
    raise KeyError(f"no HF source for GPTModel parameter {name!r}")


def load_shard(model, hf: HFTensor, cfg, tp_rank: int, tp: int) -> None:
    """Fill every parameter of this rank's GPTModel from the HF checkpoint."""
    layers = {int(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            shard = shard_for(name, hf, layers.__getitem__, cfg, tp_rank, tp)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shard {tuple(shard.shape)} vs model {tuple(param.shape)}")
            param.copy_(shard.to(param.dtype))


def safetensors_reader(folder: str) -> HFTensor:
    """Reads single tensors from a (possibly sharded) safetensors HF checkpoint, lazily."""
    from safetensors import safe_open

    root = Path(folder)
    index = root / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None

    def read(name: str) -> torch.Tensor:
        filename = files[name] if files else "model.safetensors"
        with safe_open(str(root / filename), framework="pt") as f:
            return f.get_tensor(name)

    return read
