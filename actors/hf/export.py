"""`thinker export`: a checkpoint's LoRA merged into its base model, written as a plain HF folder.

    thinker export tinker://<run>/sampler_weights/<name> ./merged [--config serve_config.yaml]
    (the command line lives in `actors.cli`)

- The base model is found by name among the config's models (weights from its `source`);
  the checkpoint root defaults to the config's.
- Each adapted projection becomes W + (alpha / r) * B @ A. A LoRA on a tied `lm_head` unties it
  (the embedding keeps the base weights), so the folder loads anywhere without PEFT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.checkpoint_store import CheckpointStore, parse_tinker_path
from actors.hf.base_model import load_base_model
from actors.peft_format import read_adapter
from configs.errors import NotFoundError
from configs.schema import BaseModelConfig, ThinkerConfig


def merged_model(model_config: BaseModelConfig, files: dict[str, bytes], cache_dir: str):
    """The base model with the adapter's update added to its weights; returns (model, tokenizer dir)."""
    loaded = load_base_model(model_config.model_copy(update={"dtype": "float32"}), cache_dir)
    model = loaded.model
    weights, config = read_adapter(files)
    scaling = float(config["lora_alpha"]) / int(config["r"])
    with torch.no_grad():
        if "lm_head" in weights and model.config.tie_word_embeddings:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        for name, (A, B) in weights.items():
            linear = model.get_submodule(name)
            linear.weight += scaling * (B.float() @ A.float()).to(linear.weight.dtype)
    return model, loaded.tokenizer_dir


def export(tinker_path: str, out_dir: str, config: ThinkerConfig, tenant: str) -> Path:
    """Merge the checkpoint at `tinker_path`, stored under `tenant`'s prefix, into its base model."""
    store = CheckpointStore(config.checkpoint_root)
    where = (tenant, *parse_tinker_path(tinker_path))
    record = store.record(*where)
    model_config = next((m for m in config.models if m.name == record.base_model), None)
    if model_config is None:
        raise NotFoundError(f"{tinker_path} needs base model {record.base_model!r}, which the config does not list")
    files = store.read_files(*where, ["adapter_model.safetensors", "adapter_config.json"])
    model, tokenizer_dir = merged_model(model_config, files, config.cache_dir)
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
