"""The HF backend: a transformers causal LM with Thinker's multi-adapter LoRA layers.

- One copy of the frozen base weights serves every adapter; each forward_backward routes the
  batch rows to their adapter (see `actors.lora.Routing`) and gradients land on that adapter's
  parameters only.
- Called from one thread at a time (the model actor's compute thread).
"""

from __future__ import annotations

import os

import torch

from actors.adapters import AdapterTable
from actors.batch import flatten_valid, pack, split_by_datum, target_logprobs, validate_data
from actors.lora import Routing, install_lora_layers
from actors.model_source import load_base_model
from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
)
from configs.schema import BaseModelConfig
from losses import get_loss


def pick_device(config: BaseModelConfig) -> torch.device:
    if config.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class HFBackend:
    def __init__(self, config: BaseModelConfig, cache_dir: str = "~/.cache/thinker"):
        self.config = config
        self.device = pick_device(config)
        if self.device.type == "cpu":
            torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        loaded = load_base_model(config, cache_dir)
        self.arch = loaded.arch
        self.tokenizer_dir = loaded.tokenizer_dir
        self.model = loaded.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.routing = Routing()
        self.lora_layers = install_lora_layers(self.model, self.routing)
        if not self.lora_layers:
            raise ValueError(f"no LoRA-able projections found in a {self.arch!r} model")
        self.adapters = AdapterTable(self.lora_layers, config.max_adapters, config.max_lora_rank, config.lora_alpha)
        hf_config = self.model.config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_seq_len = int(config.max_seq_len or getattr(hf_config, "max_position_embeddings", 2048))

    def describe(self) -> ModelDescription:
        return ModelDescription(
            name=self.config.name,
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            max_batch_tokens=self.config.max_batch_tokens,
        )

    def create_model(self, work: CreateModelWork) -> ModelInfo:
        info = ModelInfo(
            model_id=work.model_id,
            base_model=self.config.name,
            lora=work.lora,
            arch=self.arch,
            tokenizer_id=self.tokenizer_dir,
            user_metadata=dict(work.user_metadata),
        )
        self.adapters.create(info)
        return info

    def get_info(self, model_id: str) -> ModelInfo:
        return self.adapters.get(model_id).info

    def list_models(self) -> list[str]:
        return self.adapters.ids()

    def unload_model(self, model_id: str) -> None:
        self.adapters.remove(model_id)

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        self.adapters.get(work.model_id)
        spec = get_loss(work.loss_fn)
        config = spec.resolve_config(work.loss_fn_config)
        validate_data(work.data, spec, self.vocab_size, self.max_seq_len, self.config.max_batch_tokens)
        batch = pack(work.data, spec, self.device)
        self.routing.set([(work.model_id, 0, len(work.data))])
        with torch.set_grad_enabled(not work.forward_only):
            logits = self.model(input_ids=batch.tokens_BT, use_cache=False).logits
            logprobs = flatten_valid(batch, target_logprobs(logits, batch.targets_BTK))
            del logits
            out = spec(logprobs, batch.inputs, config)
            if not work.forward_only:
                out.loss.backward()
        return ForwardBackwardResult(
            loss_fn_outputs=[{"logprobs": lp} for lp in split_by_datum(batch, logprobs)],
            metrics={"loss:sum": float(out.loss.detach()), **out.metrics},
        )

    def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        return OptimStepResult(metrics=self.adapters.get(work.model_id).optim_step(work.adam))
