"""Compute-side request and result types: plain dataclasses of numpy arrays.

- The ingress builds these from the wire and the model actor consumes them; this module must
  not import torch (the ingress imports it).
- `seq_id` orders a training model's requests; None means "no ordering" (e.g. JSON routes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [N]: the model input, position i predicts target_tokens[i]
    loss_fn_inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass
class CreateModelWork:
    model_id: str
    lora: LoraSpec
    user_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ForwardBackwardWork:
    model_id: str
    seq_id: int | None
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False


@dataclass
class OptimStepWork:
    model_id: str
    seq_id: int | None
    adam: AdamParams


@dataclass
class ForwardBackwardResult:
    loss_fn_outputs: list[dict[str, np.ndarray]]  # per datum, e.g. {"logprobs": float32 [N] or [N, K]}
    metrics: dict[str, float]  # "name:reduction" -> value; always has "loss:sum"


@dataclass
class OptimStepResult:
    metrics: dict[str, float]


@dataclass
class ModelInfo:
    model_id: str
    base_model: str
    lora: LoraSpec
    arch: str
    tokenizer_id: str | None
    user_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelDescription:
    """What the ingress needs to know of a base model to validate and advertise it."""

    name: str
    vocab_size: int
    max_seq_len: int
    max_batch_tokens: int
    trainable: bool = True
    sampleable: bool = False
