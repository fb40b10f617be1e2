"""The REST routes over training runs and checkpoints (RestClient, cookbook resume checks).

- Listings read the metadata database: each tenant sees its own runs and checkpoints only, and
  another tenant's run or checkpoint answers 404 like an unknown one.
- A delete removes the database record first (nothing lists it any more), then the files.
- A checkpoint with a TTL disappears when it expires: listings and loads skip it at once, and its
  files go at the next sweep (a listing or TTL change sweeps, at most every 5 s per replica).
- External checkpoints (save_weights_external) are downloaded through signed links
  (`external_weights_urls`), fetched with a plain GET and no API key.
"""

import hashlib
import io
import tarfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from actors import ids
from actors.checkpoint_store import SEGMENTS, CheckpointStore, parse_tinker_path, tinker_path
from actors.metadata.tables import Checkpoint, TrainingRun
from actors.work import LoraSpec
from configs.errors import NotFoundError, UserError
from deployments import wire
from deployments.signed_urls import LINK_LIFETIME_S, UrlSigner
from deployments.tenancy import Tenancy, Tenant

DOWNLOAD_PREFIX = "/api/v1/checkpoint_files/"
ARCHIVE = ".archive.tar"  # a link's file name for the whole adapter as one tar (SDK 0.25 / 0.30)
SWEEP_EVERY_S = 5.0


def checkpoint_wire(row: Checkpoint) -> wire.Checkpoint:
    metadata = {k: str(v) for k, v in row.user_metadata.items()} or None
    return wire.Checkpoint(
        checkpoint_id=f"{row.segment}/{row.name}",
        checkpoint_type=SEGMENTS[row.segment],
        time=row.created_at.isoformat(),
        tinker_path=tinker_path(row.training_run_id, row.segment, row.name),
        size_bytes=row.size_bytes,
        user_metadata=metadata,
        expires_at=row.expires_at.isoformat() if row.expires_at is not None else None,
        public=bool(row.public),
    )


def run_wire(run: TrainingRun, checkpoints: list[Checkpoint]) -> wire.TrainingRun:
    """`checkpoints` newest first."""
    training = [c for c in checkpoints if c.segment == "weights"]
    sampler = [c for c in checkpoints if c.segment == "sampler_weights"]
    return wire.TrainingRun(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.tenant_id,
        lora_rank=LoraSpec(**run.lora).rank,
        last_request_time=max([run.created_at] + [c.created_at for c in checkpoints]).isoformat(),
        last_checkpoint=checkpoint_wire(training[0]) if training else None,
        last_sampler_checkpoint=checkpoint_wire(sampler[0]) if sampler else None,
        user_metadata={k: str(v) for k, v in run.user_metadata.items()} or None,
    )


class CheckpointRoutes:
    def __init__(self, tenancy: Tenancy, store: CheckpointStore):
        self._tenancy = tenancy
        self._registry = tenancy.registry
        self._store = store
        self._signer = UrlSigner(tenancy.database)
        self._next_sweep = 0.0

    def routes(self) -> list[tuple[str, str, Any]]:
        external = "/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls"
        return [
            ("GET", "/api/v1/training_runs", self.list_training_runs),
            ("GET", "/api/v1/training_runs/{run_id}", self.get_training_run),
            ("GET", "/api/v1/training_runs/{run_id}/checkpoints", self.list_checkpoints),
            ("GET", external, self.external_weights_urls),
            ("GET", DOWNLOAD_PREFIX + "{token}", self.download),
            ("PUT", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", self.set_ttl),
            ("GET", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive", self.archive),
            ("POST", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", self.publish),
            ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", self.unpublish),
            ("DELETE", "/api/v1/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", self.delete_checkpoint),
            ("GET", "/api/v1/checkpoints", self.list_user_checkpoints),
            ("POST", "/api/v1/copy_weights", self.copy_weights),
            ("POST", "/api/v1/weights_info", self.weights_info),
        ]

    async def list_training_runs(self, tenant: Tenant, limit: int = 20, offset: int = 0) -> dict:
        limit, offset = _page(limit, offset)
        runs, total = await self._tenancy.run(self._registry.runs, tenant, offset, limit, True)
        listed = [await self._run_wire(tenant, run) for run in runs]
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=total)
        return wire.TrainingRunsResponse(training_runs=listed, cursor=cursor).model_dump(exclude_none=True)

    async def get_training_run(self, run_id: str, tenant: Tenant, access_scope: str = "owned") -> dict:
        """access_scope=accessible also shows another tenant's run that has published checkpoints."""
        run_id = ids.check_id(run_id, "training run id")
        if access_scope == "accessible":
            run, rows = await self._tenancy.run(self._registry.accessible_run, tenant, run_id)
            return run_wire(run, rows).model_dump(exclude_none=True)
        if access_scope != "owned":
            raise UserError("access_scope must be owned or accessible")
        run = await self._tenancy.run(self._registry.run, tenant, run_id)
        return (await self._run_wire(tenant, run)).model_dump(exclude_none=True)

    async def list_checkpoints(self, run_id: str, tenant: Tenant, request: Request) -> dict:
        await self._sweep_now_and_then()
        await self._tenancy.run(self._registry.run, tenant, ids.check_id(run_id, "training run id"))
        rows, _ = await self._tenancy.run(self._registry.checkpoints, tenant, run_id)
        rows = _for_client(rows, request)
        rows.reverse()  # oldest first, as the listing always was
        return wire.CheckpointsListResponse(checkpoints=[checkpoint_wire(r) for r in rows]).model_dump(
            exclude_none=True
        )

    async def delete_checkpoint(self, run_id: str, checkpoint_id: str, tenant: Tenant) -> dict:
        run_id, segment, name = _checkpoint(run_id, checkpoint_id)
        await self._tenancy.run(self._registry.delete_checkpoint, tenant, run_id, segment, name)
        await self._tenancy.run(self._store.delete, tenant, run_id, segment, name)
        return {}

    async def copy_weights(self, body: wire.CopyWeightsRequest, tenant: Tenant, request: Request) -> dict:
        """A checkpoint (the tenant's own or a published one) copied into a new training run of the
        tenant that cannot be trained; the same segment and name. A retry with the same
        X-Idempotency-Key (the SDK reuses one per call) returns the same copy."""
        source = parse_tinker_path(body.source_path)
        row = await self._tenancy.run(self._registry.readable_checkpoint, tenant, *source)
        if body.session_id is not None:
            session_id = ids.check_id(body.session_id, "session_id")
            await self._tenancy.run(self._registry.session, tenant, session_id)
            run_id = ids.model_id(session_id, body.model_seq_id or 0)
        else:
            key = request.headers.get("x-idempotency-key") or uuid.uuid4().hex
            run_id = "copy-" + hashlib.sha256(f"{tenant}\n{key}".encode()).hexdigest()[:32]
        lora, metadata = LoraSpec(**row.lora), dict(row.user_metadata)
        path = tinker_path(run_id, source[1], source[2])
        if await self._tenancy.run(self._registry.run_exists, tenant, run_id):  # a retry: what is there
            await self._tenancy.run(self._registry.checkpoint, tenant, run_id, source[1], source[2])
            return {"tinker_path": path}
        await self._tenancy.run(self._registry.add_run, tenant, run_id, None, row.base_model, lora, metadata)
        await self._tenancy.run(self._registry.unload_run, run_id)  # a copy is never trained
        record = await self._tenancy.run(self._store.copy, row.tenant_id, tenant, source, run_id)
        expires = datetime.now(UTC) + timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
        copied = Checkpoint(
            training_run_id=run_id,
            segment=source[1],
            name=source[2],
            base_model=row.base_model,
            lora=dict(row.lora),
            size_bytes=record.size_bytes,
            has_optimizer=row.has_optimizer,
            user_metadata=metadata,
            expires_at=expires,
            encrypted=row.encrypted,
        )
        await self._tenancy.run(self._registry.add_checkpoint, tenant, copied)
        return {"tinker_path": path}

    async def publish(self, run_id: str, checkpoint_id: str, tenant: Tenant) -> dict:
        """Every tenant may load it (and read its weights_info); idempotent; the owner only."""
        run_id, segment, name = _checkpoint(run_id, checkpoint_id)
        await self._tenancy.run(self._registry.set_checkpoint_public, tenant, run_id, segment, name, True)
        return {}

    async def unpublish(self, run_id: str, checkpoint_id: str, tenant: Tenant) -> dict:
        run_id, segment, name = _checkpoint(run_id, checkpoint_id)
        await self._tenancy.run(self._registry.set_checkpoint_public, tenant, run_id, segment, name, False)
        return {}

    async def set_ttl(self, run_id: str, checkpoint_id: str, body: wire.CheckpointTtlRequest, tenant: Tenant) -> dict:
        """PUT .../ttl: expire `ttl_seconds` from now (3600 s to 10 years), or never (null)."""
        run_id, segment, name = _checkpoint(run_id, checkpoint_id)
        at = datetime.now(UTC) + timedelta(seconds=body.ttl_seconds) if body.ttl_seconds is not None else None
        await self._tenancy.run(self._registry.set_checkpoint_expiry, tenant, run_id, segment, name, at)
        await self._sweep_now_and_then()
        return {}

    async def external_weights_urls(self, run_id: str, name: str, request: Request, tenant: Tenant) -> dict:
        """One signed, expiring link per file of an external checkpoint (plain GET, no API key)."""
        run_id, segment, name = parse_tinker_path(tinker_path(run_id, "external_weights", name))
        row = await self._tenancy.run(self._registry.checkpoint, tenant, run_id, segment, name)
        files = await self._tenancy.run(self._store.file_names, tenant, run_id, segment, name)
        expires, at = _link_expiry(row)
        urls = {filename: self._link(request, row, filename, expires) for filename in files}
        return wire.ExternalWeightsUrlsResponse(urls=urls, expires=at).model_dump()

    async def archive(self, run_id: str, checkpoint_id: str, tenant: Tenant, request: Request) -> dict:
        """SDK 0.25 / 0.30 `get_checkpoint_archive_url`: a signed link to a tar of the PEFT adapter
        (adapter_config.json, adapter_model.safetensors) and an empty `checkpoint_complete`."""
        run_id, segment, name = _checkpoint(run_id, checkpoint_id)
        row = await self._tenancy.run(self._registry.checkpoint, tenant, run_id, segment, name)
        if row.encrypted:
            raise UserError(f"{tinker_path(run_id, segment, name)} is age-encrypted; use external_weights_urls")
        expires, at = _link_expiry(row)
        return {"url": self._link(request, row, ARCHIVE, expires), "expires": at}

    def _link(self, request: Request, row: Checkpoint, filename: str, expires: float) -> str:
        """A signed link to one file of the checkpoint `row` (ARCHIVE: all of it as a tar)."""
        claims = {"r": row.training_run_id, "s": row.segment, "n": row.name, "f": filename, "c": _stamp(row)}
        return f"{str(request.base_url).rstrip('/')}{DOWNLOAD_PREFIX}{self._signer.sign(claims, expires)}"

    async def download(self, token: str) -> Response:
        """A signed link's file (no API key: the link is the authorisation)."""
        claims = await self._tenancy.run(self._signer.verify, token)
        try:
            row = await self._tenancy.run(self._registry.find_checkpoint, claims["r"], claims["s"], claims["n"])
            if row is None or _stamp(row) != claims["c"]:  # deleted, expired, or saved anew since: gone
                raise NotFoundError("unknown or expired download link")
            where = (row.tenant_id, claims["r"], claims["s"], claims["n"])
            if claims["f"] == ARCHIVE:
                data = await self._tenancy.run(self._archive_bytes, *where)
            else:
                data = await self._tenancy.run(self._store.read_file, *where, claims["f"])
        except (KeyError, TypeError):
            raise NotFoundError("unknown or expired download link") from None
        disposition = f'attachment; filename="{claims["f"]}"'
        return Response(data, media_type="application/octet-stream", headers={"content-disposition": disposition})

    def _archive_bytes(self, tenant: str, run_id: str, segment: str, name: str) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for filename in ("adapter_config.json", "adapter_model.safetensors"):
                data = self._store.read_file(tenant, run_id, segment, name, filename)
                info = tarfile.TarInfo(filename)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tar.addfile(tarfile.TarInfo("checkpoint_complete"), io.BytesIO(b""))
        return buffer.getvalue()

    async def _sweep_now_and_then(self) -> None:
        """Delete the files of checkpoints that expired (their records go first)."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        for where in await self._tenancy.run(self._registry.take_expired_checkpoints):
            if await self._tenancy.run(self._registry.find_checkpoint, *where[1:]) is None:  # not saved anew since
                await self._tenancy.run(self._store.delete, *where)

    async def list_user_checkpoints(self, tenant: Tenant, request: Request, limit: int = 100, offset: int = 0) -> dict:
        limit, offset = _page(limit, offset)
        rows, total = await self._tenancy.run(self._registry.checkpoints, tenant, None, offset, limit)
        rows = _for_client(rows, request)
        cursor = wire.Cursor(offset=offset, limit=limit, total_count=total)
        listed = [checkpoint_wire(r) for r in rows]
        return wire.CheckpointsListResponse(checkpoints=listed, cursor=cursor).model_dump(exclude_none=True)

    async def weights_info(self, body: wire.WeightsInfoRequest, tenant: Tenant) -> dict:
        row = await self._tenancy.run(self._registry.readable_checkpoint, tenant, *parse_tinker_path(body.tinker_path))
        lora = LoraSpec(**row.lora)
        return wire.WeightsInfoResponse(
            base_model=row.base_model,
            lora_rank=lora.rank,
            train_unembed=lora.train_unembed,
            train_mlp=lora.train_mlp,
            train_attn=lora.train_attn,
        ).model_dump()

    async def _run_wire(self, tenant: str, run: TrainingRun) -> wire.TrainingRun:
        rows, _ = await self._tenancy.run(self._registry.checkpoints, tenant, run.id)
        return run_wire(run, rows)


def sdk_version(request: Request) -> tuple[int, ...] | None:
    """The calling SDK's version, from X-Stainless-Package-Version or its User-Agent (all send both)."""
    text = request.headers.get("x-stainless-package-version") or ""
    if not text:
        agent = request.headers.get("user-agent", "")
        text = agent.rsplit(" ", 1)[-1] if agent.startswith(("AsyncTinker/", "Tinker/")) else ""
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        return None


def _for_client(rows: list[Checkpoint], request: Request) -> list[Checkpoint]:
    """SDKs before 0.30 accept only training and sampler checkpoints: a listing hides the rest from them."""
    version = sdk_version(request)
    if version is not None and version < (0, 30):
        return [row for row in rows if row.segment != "external_weights"]
    return rows


def _link_expiry(row: Checkpoint) -> tuple[float, str]:
    """When a link expires: in an hour, or with its checkpoint if sooner (and that time, ISO with Z)."""
    expires = time.time() + LINK_LIFETIME_S
    if row.expires_at is not None:
        expires = min(expires, row.expires_at.timestamp())
    return expires, datetime.fromtimestamp(int(expires), UTC).isoformat().replace("+00:00", "Z")


def _stamp(row: Checkpoint) -> int:
    """A link names one save of a checkpoint: a new save under the same name invalidates it."""
    return int(row.created_at.timestamp() * 1e6)


def _checkpoint(run_id: str, checkpoint_id: str) -> tuple[str, str, str]:
    segment, _, name = checkpoint_id.partition("/")
    return parse_tinker_path(tinker_path(run_id, segment, name))


def _page(limit: int, offset: int) -> tuple[int, int]:
    if not (1 <= limit <= 1000 and 0 <= offset <= 10**9):
        raise UserError("limit must be in [1, 1000] and offset in [0, 10^9]")
    return limit, offset
