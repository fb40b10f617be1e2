"""Tinker JSON request and response types, spelled exactly as the SDK spells them.

- Requests are lenient (`extra="ignore"`: newer SDKs add fields; the `type` tag is ignored).
- Responses are strict (`extra="forbid"`) and never carry an `error` key on success.
- Only the shapes the wire needs live here; compute-side types are in `actors.work`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from actors import work
from configs.errors import LimitExceededError, UserError


class WireIn(BaseModel):
    """Base of every request body: unknown fields are ignored (newer SDKs add some); NaN and
    infinities are refused wherever a number goes."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # what torch's generators take
SeqId = Annotated[int, Field(ge=0, le=2**63 - 1)]  # a 64-bit column in the request log
# A checkpoint's time to live: one hour to ten years (Tinker's bounds); None = never expires.
TtlSeconds = Annotated[int, Field(ge=3600, le=10 * 366 * 24 * 3600)]


class WireOut(BaseModel):
    """Base of every response body: exactly the fields the SDK knows, nothing extra."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---- requests -------------------------------------------------------------------------------


class CreateSessionRequest(WireIn):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: str | None = None


class SessionRequest(WireIn):
    session_id: str


class LoraConfig(WireIn):
    rank: int = Field(32, ge=1)
    seed: Seed | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def to_spec(self) -> work.LoraSpec:
        return work.LoraSpec(**self.model_dump())


class OptimizerConfig(WireIn):
    type: str = "adamw"

    def check(self) -> None:
        """AdamW only: another optimizer (Dimuon) is refused, never silently trained with AdamW."""
        if self.type != "adamw":
            raise UserError(f"optimizer {self.type!r} is not supported; Thinker trains with AdamW")


class CreateModelRequest(WireIn):
    session_id: str
    model_seq_id: int = Field(ge=0)
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraConfig = Field(default_factory=LoraConfig)
    optimizer_config: OptimizerConfig = Field(default_factory=OptimizerConfig)


class ModelIdRequest(WireIn):
    model_id: str


class AdamParams(WireIn):
    """Lenient here (a bad value fails the optim_step's future, freeing its seq_id); checked in to_work."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=True)
    type: str | None = None  # only optimizer_params carries it; "dimuon" is not supported
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_work(self) -> work.AdamParams:
        if self.type not in (None, "adamw", "adam"):
            raise UserError(f"optimizer {str(self.type)[:40]!r} is not supported; Thinker trains with AdamW")
        valid = (
            0 <= self.learning_rate <= 10
            and 0 <= self.beta1 < 1
            and 0 <= self.beta2 < 1
            and 0 <= self.eps <= 1
            and 0 <= self.weight_decay <= 1 / max(self.learning_rate, 1e-30)
            and self.grad_clip_norm >= 0
        )
        if not valid:
            raise UserError(
                "adam_params need finite values with 0 <= learning_rate <= 10, 0 <= beta1, beta2 < 1, "
                "0 <= eps <= 1, weight_decay >= 0 with learning_rate * weight_decay <= 1, grad_clip_norm >= 0"
            )
        return work.AdamParams(**self.model_dump(exclude={"type"}))


class OptimStepRequest(WireIn):
    model_id: str
    seq_id: SeqId | None = None
    adam_params: AdamParams = Field(
        default_factory=AdamParams, validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params")
    )


class EncodedTextChunk(WireIn):
    type: str = "encoded_text"
    tokens: list[int] = Field(default_factory=list)


class ModelInput(WireIn):
    chunks: list[dict[str, Any]] = Field(default_factory=list)

    def tokens(self) -> np.ndarray:
        """The concatenated token ids; non-text chunks (images, audio) are a UserError."""
        pieces = []
        for i, chunk in enumerate(self.chunks):
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise UserError(f"prompt chunk {i} is {str(chunk.get('type'))[:40]!r}; only encoded_text is supported")
            try:
                pieces.append(EncodedTextChunk.model_validate(chunk).tokens)
            except ValidationError:
                raise UserError(f"prompt chunk {i}: tokens must be a list of integers") from None
        try:
            return np.asarray([t for piece in pieces for t in piece], dtype=np.int64)
        except OverflowError:
            raise UserError("prompt token ids must fit in 64 bits") from None


class SamplingParams(WireIn):
    max_tokens: int | None = Field(None, ge=1)
    seed: Seed | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0, le=1000)  # below 1e-5: greedy, as 0
    top_k: int = Field(-1, ge=-1)
    top_p: float = Field(1.0, gt=0, le=1)

    def to_work(self) -> work.SamplingParams:
        """`stop`: None stops at EOS; [] never stops early; token ids or strings stop besides EOS."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return work.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop_tokens=tuple(t for t in stop if isinstance(t, int)),
            stop_strings=tuple(t for t in stop if isinstance(t, str)),
            stop_at_eos=self.stop is None or bool(stop),
        )


class SampleRequest(WireIn):
    sampling_session_id: str | None = None
    base_model: str | None = None
    model_path: str | None = None
    seq_id: SeqId | None = None
    num_samples: int = Field(1, ge=1)
    prompt: ModelInput
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(0, ge=0)
    topk_sample_logprobs: int = Field(0, ge=0)
    prompt_alt_tokens_k: int = Field(0, ge=0)
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    target_prompt_logprobs: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The name of an option Thinker does not serve, if the request asks for one."""
        if self.topk_sample_logprobs:
            return "topk_sample_logprobs"
        if self.prompt_alt_tokens_k:
            return "prompt_alt_tokens_k"
        return None


MAX_TARGET_PROMPT_CELLS = 1 << 20  # [len(prompt) - 1] x K cells of target_prompt_logprobs


def target_prompt_ids(tensor: dict[str, Any], prompt_length: int) -> tuple[np.ndarray, tuple | None]:
    """`target_prompt_logprobs` (a JSON TensorData of token ids, [len(prompt) - 1, K], dense with -1
    for "nothing" or sparse CSR) as a dense int64 matrix with -1 in unasked cells, and the CSR
    (crow, col) indices when it came sparse (the answer keeps the layout)."""
    try:
        dtype, shape = tensor.get("dtype", "int64"), [int(s) for s in tensor.get("shape") or []]
        data = np.asarray(tensor.get("data") or [], dtype=np.int64)
        crow, col = tensor.get("sparse_crow_indices"), tensor.get("sparse_col_indices")
        crow = None if crow is None else np.asarray(crow, dtype=np.int64)
        col = None if col is None else np.asarray(col, dtype=np.int64)
    except (TypeError, ValueError, OverflowError, AttributeError):
        raise UserError("target_prompt_logprobs must be a TensorData of int64 token ids") from None
    if dtype != "int64" or len(shape) != 2 or data.ndim != 1:
        raise UserError(f"target_prompt_logprobs must be int64 of shape [len(prompt) - 1, K], got {dtype} {shape}")
    rows, k = shape
    if prompt_length < 2:
        raise UserError("target_prompt_logprobs needs a prompt of at least 2 tokens")
    if rows != prompt_length - 1 or k < 1:
        raise UserError(f"target_prompt_logprobs has shape {shape}; this prompt needs [{prompt_length - 1}, K >= 1]")
    if rows * k > MAX_TARGET_PROMPT_CELLS:
        raise LimitExceededError(
            f"target_prompt_logprobs has {rows * k} cells, over the limit of {MAX_TARGET_PROMPT_CELLS}"
        )
    if crow is None and col is None:
        if data.size != rows * k:
            raise UserError(f"target_prompt_logprobs has {data.size} values for shape {shape}")
        return data.reshape(rows, k), None
    if crow is None or col is None or crow.ndim != 1 or col.ndim != 1:
        raise UserError("a sparse target_prompt_logprobs needs both sparse_crow_indices and sparse_col_indices")
    ordered = len(crow) == rows + 1 and crow[0] == 0 and np.all(np.diff(crow) >= 0) and crow[-1] == len(col)
    if not ordered or len(col) != data.size or (col.size and (col.min() < 0 or col.max() >= k)):
        raise UserError(f"target_prompt_logprobs: CSR indices do not describe a [{rows}, {k}] matrix of its values")
    dense = np.full((rows, k), -1, dtype=np.int64)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = data
    if len(np.unique(row_of * k + col)) != col.size:
        raise UserError("target_prompt_logprobs: a CSR cell is listed twice")
    return dense, (crow, col)


class CreateSamplingSessionRequest(WireIn):
    session_id: str
    sampling_session_seq_id: int = Field(ge=0)
    base_model: str | None = None
    model_path: str | None = None


class SaveWeightsRequest(WireIn):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class SaveWeightsForSamplerRequest(WireIn):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    sampling_session_seq_id: int | None = None
    ttl_seconds: TtlSeconds | None = None
    user_metadata: dict[str, str] | None = None


class SaveWeightsExternalRequest(WireIn):
    model_id: str
    path: str
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    age_encryption_recipients: list[str] | None = Field(None, max_length=10)


class CopyWeightsRequest(WireIn):
    source_path: str
    destination_project_id: str | None = None
    session_id: str | None = None  # SDK 0.30: the copy's run is <session_id>:train:<model_seq_id>
    model_seq_id: int | None = Field(None, ge=0)
    ttl_seconds: TtlSeconds | None = None


class CreateCustomLossRequest(WireIn):
    """The graph is checked against the allow-list (losses.graph_rules) and fails the future if bad."""

    session_id: str
    custom_loss_seq_id: int = Field(ge=0, le=2**53)
    name: Any
    inputs: Any
    graph: Any


class CheckpointTtlRequest(WireIn):
    ttl_seconds: TtlSeconds | None = None


class LoadWeightsRequest(WireIn):
    model_id: str | None = None
    seq_id: SeqId | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool = False
    optimizer_config: OptimizerConfig | None = None  # create-via-load: AdamW only (Dimuon is refused)


class WeightsInfoRequest(WireIn):
    tinker_path: str


class RetrieveFutureRequest(WireIn):
    request_id: str
    allow_metadata_only: bool = False


class SamplingSessionTarget(WireIn):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = Field(ge=0, le=10**9)  # a sample's seq_id // 1e9


class RetrieveFuturesRequest(WireIn):
    target: SamplingSessionTarget
    prev_cursor: int = Field(0, ge=0)
    timeout: float | None = Field(None, ge=0)  # None: long-poll; 0: answer at once
    retrieved_request_ids: list[str] = Field(default_factory=list, max_length=100_000)


class JoinSamplingSessionRequest(WireIn):
    sampling_session_id: str


# ---- the simple JSON routes' requests (the original server's shapes) -------------------------

SIMPLE_RANK = 16  # the original server's LoRA rank


class ChatForwardBackwardRequest(WireIn):
    model_id: str
    data: list[list[dict[str, str]]]
    loss_fn: str = "cross_entropy"
    loss_fn_inputs: dict[str, list[list[float]]] | None = None
    loss_fn_config: dict[str, float] | None = None

    def inputs_per_conversation(self) -> list[dict[str, np.ndarray]]:
        if not self.loss_fn_inputs:
            return []
        counts = {len(v) for v in self.loss_fn_inputs.values()}
        if counts != {len(self.data)}:
            raise UserError(f"every loss_fn_inputs list needs one entry per conversation ({len(self.data)})")
        return [
            {
                key: np.asarray(values[i], dtype=np.int64 if key == "target_tokens" else np.float32)
                for key, values in self.loss_fn_inputs.items()
            }
            for i in range(len(self.data))
        ]


class AddLoraRequest(WireIn):
    model_id: str
    base_model: str | None = None
    rank: int = Field(SIMPLE_RANK, ge=1)
    seed: Seed | None = None


class GenerateRequest(WireIn):
    model_id: str | None = None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0, le=1000)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    num_samples: int = Field(1, ge=1)


# ---- responses ------------------------------------------------------------------------------


class ClientConfigResponse(WireOut):
    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool = False
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False
    custom_loss_server_side: bool = True  # create_custom_loss uploads the graph; it runs in our pass
    sample_use_retrieve_futures: bool = True  # one retrieve_futures long-poll per sampling client
    sample_join_sampling_session: bool = True  # a rebuilt sampling client asks for its clone number


class CreateSessionResponse(WireOut):
    type: Literal["create_session"] = "create_session"
    session_id: str


class HeartbeatResponse(WireOut):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class TelemetryResponse(WireOut):
    status: Literal["accepted"] = "accepted"


class HealthResponse(WireOut):
    status: Literal["ok"] = "ok"
    models: dict[str, str] = Field(default_factory=dict)  # base model -> ready | loading | failed


class SupportedModel(WireOut):
    model_name: str
    max_context_length: int
    trainable: bool
    sampleable: bool
    state: Literal["ready", "loading", "failed"] = "ready"  # Thinker's: clients ignore unknown fields
    detail: str | None = None  # why it is not ready, when Serve or the model says


class ServerCapabilities(WireOut):
    supported_models: list[SupportedModel]

    @classmethod
    def of(cls, models: list) -> ServerCapabilities:
        """From `ModelHandles.states`: a model not ready yet is listed, untrainable, with its state."""
        listed = []
        for m in models:
            d = m.description
            if d is None:
                listed.append(
                    SupportedModel(
                        model_name=m.name,
                        max_context_length=0,
                        trainable=False,
                        sampleable=False,
                        state=m.state,
                        detail=m.detail,
                    )
                )
            else:
                listed.append(
                    SupportedModel(
                        model_name=d.name,
                        max_context_length=d.max_seq_len,
                        trainable=d.trainable,
                        sampleable=d.sampleable,
                    )
                )
        return cls(supported_models=listed)


class UntypedAPIFuture(WireOut):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class CreateModelResponse(WireOut):
    type: Literal["create_model"] = "create_model"
    model_id: str


class ModelData(WireOut):
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


class GetInfoResponse(WireOut):
    type: Literal["get_info"] = "get_info"
    model_id: str
    model_data: ModelData
    is_lora: bool = True
    lora_rank: int | None = None
    model_name: str | None = None
    last_seq_id: int | None = None  # Thinker's: where a client attaching to the model numbers from

    @classmethod
    def of(cls, info: work.ModelInfo) -> GetInfoResponse:
        return cls(
            model_id=info.model_id,
            model_data=ModelData(arch=info.arch, model_name=info.base_model, tokenizer_id=info.tokenizer_id),
            lora_rank=info.lora.rank,
            model_name=info.base_model,
            last_seq_id=info.last_seq_id,
        )


class UnloadModelResponse(WireOut):
    type: Literal["unload_model"] = "unload_model"
    model_id: str


def finite_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    """Metrics for JSON: NaN and infinities (a diverged run) become null instead of failing the answer."""
    return {key: (float(v) if math.isfinite(v) else None) for key, v in metrics.items()}


class OptimStepResponse(WireOut):
    metrics: dict[str, float | None]


class CreateSamplingSessionResponse(WireOut):
    type: Literal["create_sampling_session"] = "create_sampling_session"
    sampling_session_id: str


class GetSamplerResponse(WireOut):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class SaveWeightsResponse(WireOut):
    type: Literal["save_weights"] = "save_weights"
    path: str


class SaveWeightsExternalResponse(WireOut):
    type: Literal["save_weights_external"] = "save_weights_external"
    path: str
    size_bytes: int | None = None


class ExternalWeightsUrlsResponse(WireOut):
    urls: dict[str, str]
    expires: str


class SaveWeightsForSamplerResponse(WireOut):
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"
    path: str | None = None
    sampling_session_id: str | None = None


class FutureCompletion(WireOut):
    state: Literal["finished", "failed"]
    request_id: str


class RetrieveFuturesResponse(WireOut):
    completions: list[FutureCompletion]
    cursor: int


class JoinSamplingSessionResponse(WireOut):
    type: Literal["join_sampling_session"] = "join_sampling_session"
    client_counter: int


class CreateCustomLossResponse(WireOut):
    type: Literal["create_custom_loss"] = "create_custom_loss"
    loss_id: str


class LoadWeightsResponse(WireOut):
    type: Literal["load_weights"] = "load_weights"
    path: str
    model_id: str


class Cursor(WireOut):
    offset: int
    limit: int
    total_count: int


class Checkpoint(WireOut):
    checkpoint_id: str
    checkpoint_type: Literal["training", "sampler", "external"]
    time: str
    tinker_path: str
    size_bytes: int
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: str | None = None


class TrainingRun(WireOut):
    training_run_id: str
    base_model: str
    model_owner: str = "thinker"
    is_lora: bool = True
    corrupted: bool = False
    lora_rank: int
    last_request_time: str
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsResponse(WireOut):
    training_runs: list[TrainingRun]
    cursor: Cursor


class CheckpointsListResponse(WireOut):
    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


class WeightsInfoResponse(WireOut):
    base_model: str
    is_lora: bool = True
    lora_rank: int
    train_unembed: bool
    train_mlp: bool
    train_attn: bool


class TryAgainResponse(WireOut):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"


class RequestFailedResponse(WireOut):
    error: str
    category: Literal["user", "server", "unknown"]
