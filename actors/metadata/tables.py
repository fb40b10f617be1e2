"""The metadata schema (SQLAlchemy 2 declarative). Changes go through an alembic migration in
`migrations/versions/`; `tests/unit/test_metadata.py` checks that the migrations build exactly
this schema.

- Every row that a client can name (session, training run, sampler, checkpoint) has a `tenant_id`:
  the owner. Another tenant's row is looked up as if it did not exist.
- API keys are stored as SHA-256 digests only (keys are 256-bit random, so a slow hash adds
  nothing); `key_prefix` keeps the first characters for `thinker keys list`.
- Times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ID = String(128)  # actors.ids.MAX_LENGTH


class UtcDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UtcDateTime}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(ID, primary_key=True)  # also the tenant's storage prefix
    kind: Mapped[str] = mapped_column(String(16))  # "named" (keys mode), "key" (open mode), "anonymous"
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    issued: Mapped[bool] = mapped_column(Boolean, default=True)  # by `thinker keys create` (else seen in open mode)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Session(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    sdk_version: Mapped[str | None] = mapped_column(String(64), default=None)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"tags": [...]}
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    project_id: Mapped[str | None] = mapped_column(String(128), default=None)
    display_name: Mapped[str | None] = mapped_column(String(256), default=None)
    # success | errored | interrupted (its client's word), or expired (no heartbeat for session_expiry_s)
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    finish_detail: Mapped[str | None] = mapped_column(String(1024), default=None)
    last_seen_at: Mapped[datetime | None] = mapped_column(default=utc_now)  # its start, then its last sign of life
    released_at: Mapped[datetime | None] = mapped_column(default=None)  # expired, and its models released

    __table_args__ = (
        Index("ix_sessions_open", "finished_at", "last_seen_at"),
        Index("ix_sessions_release", "finish_reason", "released_at"),
    )


class TrainingRun(Base):
    """A training model (`{session}:train:{n}`, or a simple route's adapter name): its record
    outlives the adapter (unloaded_at), so its checkpoints stay listed."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    lora: Mapped[dict[str, Any]] = mapped_column(default=dict)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    unloaded_at: Mapped[datetime | None] = mapped_column(default=None)
    # The newest durable snapshot (weights + AdamW state, under the tenant's storage prefix) was
    # taken right after the optim_step of this seq_id, submitted at durable_at.
    durable_seq: Mapped[int | None] = mapped_column(BigInteger, default=None)
    durable_at: Mapped[datetime | None] = mapped_column(default=None)


class Sampler(Base):
    __tablename__ = "samplers"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    session_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str | None] = mapped_column(String(512), default=None)
    # a snapshot of this training model's weights (save_weights_for_sampler without a path)
    source_model_id: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    removed_at: Mapped[datetime | None] = mapped_column(default=None)
    clones: Mapped[int] = mapped_column(Integer, default=0)  # join_sampling_session counters handed out


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("training_run_id", "segment", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    training_run_id: Mapped[str] = mapped_column(ID, index=True)
    segment: Mapped[str] = mapped_column(String(32))  # weights | sampler_weights | external_weights
    name: Mapped[str] = mapped_column(ID)
    base_model: Mapped[str] = mapped_column(String(256))
    lora: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    has_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # gone (unlisted, unloadable) after this
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)  # files stored as age ciphertext (<file>.age)
    public: Mapped[bool] = mapped_column(Boolean, default=False)  # published: every tenant may load it


class Usage(Base):
    """Tokens trained and sampled per tenant, session and base model, in hourly buckets."""

    __tablename__ = "usage"
    __table_args__ = (
        UniqueConstraint("tenant_id", "session_id", "base_model", "kind", "bucket_start"),
        Index("ix_usage_tenant_bucket", "tenant_id", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"))
    session_id: Mapped[str] = mapped_column(ID, default="")  # "" when the work had no session
    base_model: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(32))  # tokens_trained | tokens_sampled
    bucket_start: Mapped[datetime] = mapped_column()
    amount: Mapped[int] = mapped_column(BigInteger, default=0)


class Request(Base):
    """A submitted request (a future): who owns it, which model deployment runs it, and once it is
    finished its outcome, so any ingress replica can answer it after the one that took it is gone."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_created", "created_at"),
        Index("ix_requests_completions", "sampling_target", "completion_seq"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # the Tinker verb; decides the answer's encoding
    base_model: Mapped[str | None] = mapped_column(String(256), default=None)  # whose deployment runs it
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | done | failed
    outcome: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # pickled value or exception
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what the answer's encoding needs
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    # The request log of a training model: what to run again after its deployment restarts.
    model_id: Mapped[str | None] = mapped_column(ID, default=None, index=True)
    seq_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    verb: Mapped[str | None] = mapped_column(String(64), default=None)  # the model actor's method
    payload: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)  # its pickled arguments
    # retrieve_futures: a sample's "<sampler id>#<clone>", and once finished its place in that target's
    # order of completions (its Counter, taken last in the finishing transaction: commit order)
    sampling_target: Mapped[str | None] = mapped_column(String(160), default=None)
    completion_seq: Mapped[int | None] = mapped_column(BigInteger, default=None)


class SampledSequenceRecord(Base):
    """What a sample taken with `record_stability_info` leaves for `stable_reinforce`: the request's
    prompt, the sequence's tokens and the sampler's own log-probs of them, owned by the session that
    sampled, kept a day from its last use."""

    __tablename__ = "sampled_sequences"
    __table_args__ = (Index("ix_sampled_sequences_used", "last_used_at"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)  # the sequence id: "<request id>:<index>"
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"))
    session_id: Mapped[str | None] = mapped_column(ID, default=None)
    prompt: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian token ids
    tokens: Mapped[bytes] = mapped_column(LargeBinary)  # int32 little-endian token ids
    logprobs: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian, one per token
    last_used_at: Mapped[datetime] = mapped_column(default=utc_now)


class ServerSecret(Base):
    """Secrets every replica shares (e.g. the key that signs download URLs), made on first use."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class CustomLossRecord(Base):
    """A loss uploaded with `create_custom_loss`: its traced graph as the client sent it (checked
    against `losses.graph_rules` before it was stored), usable by its session's training requests."""

    __tablename__ = "custom_losses"
    __table_args__ = (UniqueConstraint("session_id", "seq_id", name="uq_custom_losses_session_seq"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)  # the loss_id: "<session>:loss:<seq>"
    tenant_id: Mapped[str] = mapped_column(ID, ForeignKey("tenants.id"))
    session_id: Mapped[str] = mapped_column(ID)
    seq_id: Mapped[int] = mapped_column(BigInteger)  # custom_loss_seq_id
    digest: Mapped[str] = mapped_column(String(64))  # sha256 of name, inputs and graph
    upload: Mapped[dict[str, Any]] = mapped_column()  # {"name", "inputs", "graph"}
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Counter(Base):
    """A named counter whose row lock orders what takes from it (e.g. one sampling client's
    completions: the counter is named after its target)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(192), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
