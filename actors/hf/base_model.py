"""The base model as a transformers module: from its resolved source, or seeded random weights.

Random models (`random_init`, for tests and development) are rebuilt identically from
`random_seed` in any process, so the Megatron ranks and this backend hold the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actors.model_source import DTYPES, resolve_source, tokenizer_source
from configs.schema import BaseModelConfig


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer_dir: str | None  # a folder (or hub id) AutoTokenizer can load; None for random models
    arch: str


def load_base_model(config: BaseModelConfig, cache_dir: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = DTYPES[config.dtype]
    if config.random_init is not None:
        hf_config = LlamaConfig(**config.random_init)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.random_seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        tokenizer_dir = tokenizer_source(config, cache_dir, hf_config.vocab_size)
        return LoadedModel(model=model, tokenizer_dir=tokenizer_dir, arch=hf_config.model_type)
    path = resolve_source(config, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return LoadedModel(model=model, tokenizer_dir=path, arch=model.config.model_type)
