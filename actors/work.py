"""Compute-side request and result types: plain dataclasses of numpy arrays.

- The ingress builds these from the wire and the model actor consumes them; this module must
  not import torch (the ingress imports it).
- `seq_id` orders a training model's requests; None means "no ordering" (e.g. JSON routes).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from configs.errors import UserError
from losses.graph_rules import CustomLoss

if TYPE_CHECKING:
    from configs.schema import BaseModelConfig

# Hugging Face module names (the leaf of the module path) that take LoRA weights, by scope.
LORA_TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "unembed": ("lm_head",),
}


def target_scope(module_name: str) -> str | None:
    """'attn', 'mlp' or 'unembed' for a LoRA-able HF module name, None otherwise."""
    leaf = module_name.rsplit(".", 1)[-1]
    return next((scope for scope, leaves in LORA_TARGETS.items() if leaf in leaves), None)


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [N]: the model input, position i predicts target_tokens[i]
    loss_fn_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # Positions before loss_from are context only: loss inputs cover positions loss_from..N-1.
    # Tinker datums score every position (0); chat data of the simple JSON routes skip the prompt.
    loss_from: int = 0

    @property
    def num_scored(self) -> int:
        return int(self.tokens.shape[0]) - self.loss_from


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: its rank, init seed and which module scopes it trains. Both backends
    ask it which HF modules get weights (`targets`), so their adapters match module for module."""

    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def seeded(self) -> LoraSpec:
        """This spec, with a fresh random seed when it has none (the adapter's init must be replayable)."""
        return self if self.seed is not None else replace(self, seed=secrets.randbits(63))

    def validate(self, max_rank: int) -> None:
        if not 1 <= self.rank <= max_rank:
            raise UserError(f"LoRA rank must be between 1 and {max_rank} (max_lora_rank), got {self.rank}")
        if not self.scopes():
            raise UserError("at least one of train_attn, train_mlp, train_unembed must be true")

    def scopes(self) -> frozenset[str]:
        on = {"attn": self.train_attn, "mlp": self.train_mlp, "unembed": self.train_unembed}
        return frozenset(scope for scope, trained in on.items() if trained)

    def targets(self, module_name: str) -> bool:
        """Whether this adapter puts LoRA weights on the HF module `module_name`."""
        return target_scope(module_name) in self.scopes()


@dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


ANONYMOUS = "anonymous"  # the tenant of requests without an API key (open mode)


@dataclass
class CreateModelWork:
    model_id: str
    lora: LoraSpec
    user_metadata: dict[str, Any] = field(default_factory=dict)
    tenant: str = ANONYMOUS  # the owner: its checkpoints live under this tenant's storage prefix


@dataclass
class ForwardBackwardWork:
    model_id: str
    seq_id: int | None
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    forward_only: bool = False
    tenant: str = ANONYMOUS
    custom_loss: CustomLoss | None = None  # loss_fn "custom": the uploaded loss it names


@dataclass
class OptimStepWork:
    model_id: str
    seq_id: int | None
    adam: AdamParams
    tenant: str = ANONYMOUS  # the owner: the durable snapshot after the step goes under its prefix


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
    last_seq_id: int | None = None  # the highest request seq_id the model actor has been sent


@dataclass
class ModelDescription:
    """What the ingress needs to know of a base model to validate and advertise it."""

    name: str
    vocab_size: int
    max_seq_len: int
    max_batch_tokens: int
    trainable: bool = True
    sampleable: bool = False
    tokenizer_id: str | None = None

    @classmethod
    def of(
        cls, config: BaseModelConfig, vocab_size: int, max_seq_len: int, tokenizer_id: str | None
    ) -> ModelDescription:
        return cls(
            name=config.name,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            max_batch_tokens=config.max_batch_tokens,
            sampleable=True,
            tokenizer_id=tokenizer_id,
        )


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the model's default_max_tokens
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 = off
    top_p: float = 1.0
    seed: int | None = None  # same seed, same output
    stop_tokens: tuple[int, ...] = ()  # stop after any of these, besides EOS
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True  # Tinker's `stop=[]` turns this off: decode until max_tokens


@dataclass
class SampleWork:
    sampler_id: str  # sampling session id, training model id, or base model name
    seq_id: int | None
    prompt: np.ndarray  # int64 [L]
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    tenant: str = ANONYMOUS
    record_stability: bool = False  # keep prompt, tokens and log-probs per sequence id (stable_reinforce)
    target_prompt_ids: np.ndarray | None = None  # int64 [L - 1, K]: log-probs wanted at positions 1..L-1 (-1: none)
    target_prompt_layout: tuple[np.ndarray, np.ndarray] | None = None  # the request's CSR (crow, col), if sparse
    request_id: str | None = None  # its future's id (set by the model actor; cancel_future names it)


@dataclass
class SampledSequence:
    tokens: np.ndarray  # int32, the stop token / stop string's tokens included
    logprobs: np.ndarray  # float32, the model's log-prob of each sampled token (before temperature)
    stop_reason: str  # "stop" | "length"


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: np.ndarray | None = None  # float32 [L], NaN at 0
    topk_prompt_ids: np.ndarray | None = None  # int32 [L, k]
    topk_prompt_logprobs: np.ndarray | None = None  # float32 [L, k]
    target_prompt_logprobs: np.ndarray | None = None  # float32 [L - 1, K]: SampleWork.target_prompt_ids' scores
    target_prompt_layout: tuple[np.ndarray, np.ndarray] | None = None  # the request's CSR (crow, col), if sparse


@dataclass
class SamplerInfo:
    sampler_id: str
    base_model: str
    model_path: str | None = None  # tinker:// path of the sampler weights, if any
    source_model_id: str | None = None  # training model it was snapshot from, if any


@dataclass
class ChatForwardBackwardWork:
    """The simple JSON route's forward_backward: chat conversations rendered by the actor."""

    model_id: str
    conversations: list[list[dict[str, str]]]
    loss_fn: str
    loss_fn_inputs: list[dict[str, np.ndarray]]  # per conversation, may be empty
    loss_fn_config: dict[str, float | str] = field(default_factory=dict)
    create_with: LoraSpec | None = None  # create the adapter first if it does not exist
    tenant: str = ANONYMOUS


@dataclass
class GenerateWork:
    """The simple JSON route's generate: a text prompt or chat messages, answered with text."""

    sampler_id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant: str = ANONYMOUS


@dataclass
class GeneratedText:
    texts: list[str]  # one per sample, special tokens left out
    tokens: list[list[int]]
    logprobs: list[list[float]]
    stop_reasons: list[str]
    prompt_tokens: int
