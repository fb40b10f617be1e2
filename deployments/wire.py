"""Tinker JSON request and response types, spelled exactly as the SDK spells them.

- Requests are lenient (`extra="ignore"`: newer SDKs add fields; the `type` tag is ignored).
- Responses are strict (`extra="forbid"`) and never carry an `error` key on success.
- Only the shapes the wire needs live here; compute-side types are in `actors.work`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from actors import work
from configs.errors import UserError


class WireIn(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class WireOut(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---- requests -------------------------------------------------------------------------------


class CreateSessionRequest(WireIn):
    tags: list[str] = Field(default_factory=list)
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None


class SessionRequest(WireIn):
    session_id: str


class LoraConfig(WireIn):
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True

    def to_spec(self) -> work.LoraSpec:
        return work.LoraSpec(**self.model_dump())


class OptimizerConfig(WireIn):
    type: str = "adamw"


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
    type: str | None = None  # only optimizer_params carries it; "dimuon" is not supported
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def to_work(self) -> work.AdamParams:
        if self.type not in (None, "adamw", "adam"):
            raise UserError(f"optimizer {self.type!r} is not supported; Thinker trains with AdamW")
        if self.learning_rate < 0 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.eps < 0:
            raise UserError("adam_params need learning_rate >= 0, 0 <= beta1, beta2 < 1 and eps >= 0")
        return work.AdamParams(**self.model_dump(exclude={"type"}))


class OptimStepRequest(WireIn):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams = Field(
        default_factory=AdamParams, validation_alias=AliasChoices("adam_params", "optim_params", "optimizer_params")
    )


class RetrieveFutureRequest(WireIn):
    request_id: str
    allow_metadata_only: bool = False


# ---- responses ------------------------------------------------------------------------------


class ClientConfigResponse(WireOut):
    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool = False
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = False


class CreateSessionResponse(WireOut):
    type: Literal["create_session"] = "create_session"
    session_id: str


class HeartbeatResponse(WireOut):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class TelemetryResponse(WireOut):
    status: Literal["accepted"] = "accepted"


class HealthResponse(WireOut):
    status: Literal["ok"] = "ok"


class SupportedModel(WireOut):
    model_name: str
    max_context_length: int
    trainable: bool
    sampleable: bool


class ServerCapabilities(WireOut):
    supported_models: list[SupportedModel]


class UntypedAPIFuture(WireOut):
    request_id: str
    model_id: str | None = None


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

    @classmethod
    def of(cls, info: work.ModelInfo) -> GetInfoResponse:
        return cls(
            model_id=info.model_id,
            model_data=ModelData(arch=info.arch, model_name=info.base_model, tokenizer_id=info.tokenizer_id),
            lora_rank=info.lora.rank,
            model_name=info.base_model,
        )


class UnloadModelResponse(WireOut):
    type: Literal["unload_model"] = "unload_model"
    model_id: str


class OptimStepResponse(WireOut):
    metrics: dict[str, float]


class TryAgainResponse(WireOut):
    type: Literal["try_again"] = "try_again"
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"


class RequestFailedResponse(WireOut):
    error: str
    category: Literal["user", "server", "unknown"]
