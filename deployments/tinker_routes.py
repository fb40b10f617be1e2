"""Tinker's /api/v1 routes: sessions, training, weights, sampling and futures.

- A submission is decoded and validated here, checked against what the caller's tenant owns
  (another tenant's id is a 404, as if it did not exist), handed to the model deployment of its
  base model, and answered at once with a request id whose future is the Ray ref of that call.
- `retrieve_future` long-polls that ref (`long_poll_s`), answering 408 + try_again while it is
  pending; an await never blocks other requests.
- A problem inside a datum fails the request's future (the SDK raises RequestFailedError and
  stays usable) and frees its seq_id; an unusable request is a 4xx `{error, category}`.
"""

import asyncio
import logging
import time
from datetime import timedelta
from functools import partial
from typing import Any

from cachetools import LRUCache
from fastapi.responses import JSONResponse, Response

from actors import ids
from actors.age_files import parse_recipients
from actors.checkpoint_store import parse_tinker_path
from actors.metadata.custom_losses import CustomLosses
from actors.metadata.futures import LoggedCall
from actors.metadata.registry import finished_message
from actors.metadata.sequences import SampledSequences
from actors.metadata.tables import utc_now
from actors.work import CreateModelWork, LoraSpec, OptimStepWork, SampleWork
from configs.errors import NotFoundError, SessionFinishedError, UserError
from configs.schema import ThinkerConfig
from deployments import wire, wire_proto
from deployments.futures import Futures, deployment_call
from deployments.limits import Limits
from deployments.model_handles import ModelHandles
from deployments.session_routes import FinishRequest
from deployments.tenancy import Tenancy, Tenant
from losses.graph_rules import CUSTOM

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
CLONE_STRIDE = 1_000_000_000  # a sampling client clone numbers its samples from clone * 1e9
CAPABILITIES_WAIT_S = 3.0  # how long capabilities wait for a model to describe itself (once per replica)
HEALTH_WAIT_S = 0.2
KNOWN_SESSIONS = 65_536  # (tenant, session) pairs a replica remembers as owned, for heartbeats
RECORD_HEARTBEAT_EVERY_S = 60.0  # the longest a session's heartbeats go unrecorded (per replica)
EXPIRY_SWEEP_EVERY_S = 60.0  # the longest between two session expiry sweeps of a replica (while heartbeats come)
RETRIEVE_FUTURES_WAIT_S = 25.0  # the longest retrieve_futures long-poll (the SDK reads for 45 s)


def encode_result(kind: str, value: Any, meta: dict[str, Any]) -> Response:
    """A finished future's wire form: protobuf for forward_backward and sampling, JSON otherwise."""
    if kind == "forward_backward":
        return Response(wire_proto.encode_forward_backward_output(value), media_type=PROTOBUF)
    if kind == "sample":
        return Response(wire_proto.encode_sample_response(value, meta.get("last_n")), media_type=PROTOBUF)
    bodies = {
        "optim_step": lambda: wire.OptimStepResponse(metrics=wire.finite_metrics(value.metrics)),
        "create_model": lambda: wire.CreateModelResponse(model_id=value.model_id),
        "unload_model": lambda: wire.UnloadModelResponse(model_id=value),
        "save_weights": lambda: wire.SaveWeightsResponse(path=value),
        "save_weights_external": lambda: wire.SaveWeightsExternalResponse(**value),
        "save_weights_for_sampler": lambda: (
            wire.SaveWeightsForSamplerResponse(path=value)
            if value.startswith("tinker://")
            else wire.SaveWeightsForSamplerResponse(sampling_session_id=value)
        ),
        "load_weights": lambda: wire.LoadWeightsResponse(path=meta["path"], model_id=meta["loaded"]),
        "create_custom_loss": lambda: wire.CreateCustomLossResponse(loss_id=value),
    }
    if kind not in bodies:
        raise ValueError(f"no encoding for future kind {kind!r}")
    return JSONResponse(bodies[kind]().model_dump(exclude_none=True))


class TinkerRoutes:
    def __init__(self, models: ModelHandles, futures: Futures, tenancy: Tenancy, config: ThinkerConfig):
        self._models = models
        self._futures = futures
        self._tenancy = tenancy
        self._registry = tenancy.registry
        self._config = config
        self._limits = Limits(config.limits)
        self._sequences = SampledSequences(tenancy.database)
        self._custom_losses = CustomLosses(tenancy.database)
        # (tenant, session) -> when this replica last recorded its heartbeat (owned: no database read till the next)
        self._known_sessions: LRUCache = LRUCache(KNOWN_SESSIONS)
        expiry = config.session_expiry_s
        self._record_every = min(RECORD_HEARTBEAT_EVERY_S, expiry / 10) if expiry else float("inf")
        self._next_expiry = 0.0
        self._expiring: asyncio.Task | None = None
        self._started = time.monotonic()

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/api/v1/client/config", self.client_config),
            ("POST", "/api/v1/client/dynamic_config", self.dynamic_config),
            ("POST", "/api/v1/create_session", self.create_session),
            ("POST", "/api/v1/session_heartbeat", self.session_heartbeat),
            ("POST", "/api/v1/telemetry", self.telemetry),
            ("POST", "/api/v1/sessions/{session_id}/finish", self.finish_session),
            ("GET", "/api/v1/healthz", self.healthz),
            ("GET", "/healthz", self.healthz),  # the original server's paths of the same three
            ("GET", "/api/v1/get_server_capabilities", self.get_server_capabilities),
            ("GET", "/get_server_capabilities", self.get_server_capabilities),
            ("POST", "/api/v1/create_model", self.create_model),
            ("POST", "/api/v1/get_info", self.get_info),
            ("POST", "/get_info", self.get_info),
            ("POST", "/api/v1/unload_model", self.unload_model),
            ("POST", "/api/v1/optim_step", self.optim_step),
            ("POST", "/api/v1/create_custom_loss", self.create_custom_loss),
            ("POST", "/api/v1/save_weights", self.save_weights),
            ("POST", "/api/v1/save_weights_external", self.save_weights_external),
            ("POST", "/api/v1/save_weights_for_sampler", self.save_weights_for_sampler),
            ("POST", "/api/v1/load_weights", self.load_weights),
            ("POST", "/api/v1/create_sampling_session", self.create_sampling_session),
            ("GET", "/api/v1/samplers/{sampler_id}", self.get_sampler),
            ("POST", "/api/v1/asample", self.asample),
            ("POST", "/api/v1/cancel_future", self.cancel_future),
            ("POST", "/api/v1/retrieve_future", self.retrieve_future),
            ("POST", "/api/v1/retrieve_futures", self.retrieve_futures),
            ("POST", "/api/v1/join_sampling_session", self.join_sampling_session),
        ]

    # ---- sessions and service ------------------------------------------------------------------

    async def client_config(self) -> dict:
        return wire.ClientConfigResponse().model_dump()

    async def dynamic_config(self) -> dict:
        # cancel_future stops an abandoned sample's generation (its rows leave the batch)
        return {"sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}

    async def create_session(self, body: wire.CreateSessionRequest, tenant: Tenant) -> dict:
        self._limits.check_metadata("tags and user_metadata", [body.tags, body.user_metadata])
        registry, metadata = self._registry, body.user_metadata or {}
        session_id = await self._tenancy.run(
            registry.create_session, tenant, body.sdk_version, body.tags, metadata, body.project_id, body.display_name
        )
        return wire.CreateSessionResponse(session_id=session_id).model_dump()

    async def session_heartbeat(self, body: wire.SessionRequest, tenant: Tenant) -> dict:
        """A sign of life of the session (for `session_expiry_s`): 404 for an unknown or another
        tenant's session, 410 for a finished one (the SDK then stops). Also drives the expiry sweep."""
        await self._seen(tenant, ids.check_id(body.session_id, "session_id"), answer=True)
        self._expire_now_and_then()
        return wire.HeartbeatResponse().model_dump()

    async def _seen(self, tenant: str, session_id: str, answer: bool = False) -> None:
        """A sign of life of the session (its heartbeat, or a request for one of its models or
        samplers), recorded at most every `_record_every` per session and replica; in between, a
        session this replica has seen owned and open is answered without the database (a session
        never changes owner). With `answer`, an unknown or another tenant's session raises
        NotFoundError and a finished one SessionFinishedError; else they are let be."""
        key = (tenant, session_id)
        recorded = self._known_sessions.get(key)  # NOTE: get, not `in`: it marks the pair as used
        now = time.monotonic()
        if recorded is not None and now - recorded < self._record_every:
            return
        try:
            row = await self._tenancy.run(self._registry.touch_session, tenant, session_id)
        except NotFoundError:
            if answer:
                raise
            return
        if row.finished_at is not None:
            self._known_sessions.pop(key, None)
            if answer:
                raise SessionFinishedError(finished_message(row))
            return
        self._known_sessions[key] = now

    def _expire_now_and_then(self) -> None:
        """Start an expiry sweep in the background when one is due. Heartbeats drive it: while any
        client is connected, idle sessions expire within `session_expiry_s` + a sweep period. A
        replica sweeps only once it has been up for `session_expiry_s`: a client that could not
        reach the server while it was down is not idle for that time."""
        expiry = self._config.session_expiry_s
        now = time.monotonic()
        if not expiry or now < self._next_expiry or now - self._started < expiry:
            return
        if self._expiring is not None and not self._expiring.done():
            return
        self._next_expiry = now + min(EXPIRY_SWEEP_EVERY_S, expiry / 4)
        self._expiring = asyncio.get_running_loop().create_task(self.expire_sessions())

    async def expire_sessions(self) -> int:
        """Finish the sessions idle for `session_expiry_s` and release what they held (training
        models unloaded, samplers removed, everywhere); how many were released. A release that
        fails (a model deployment restarting) is tried again by the next sweep."""
        try:
            before = utc_now() - timedelta(seconds=self._config.session_expiry_s)
            await self._tenancy.run(self._registry.expire_idle_sessions, before)
            pending = await self._tenancy.run(self._registry.sessions_to_release)
        except Exception:
            logger.exception("the session expiry sweep failed; the next one tries again")
            return 0
        released = 0
        for tenant, session_id in pending:
            try:
                await self._release_session(tenant, session_id)
                await self._tenancy.run(self._registry.mark_released, session_id)
                released += 1
            except Exception as exc:
                logger.warning("expired session %s: release failed, the next sweep tries again: %s", session_id, exc)
        if released:
            logger.info("released %d expired sessions", released)
        return released

    async def telemetry(self) -> dict:
        return wire.TelemetryResponse().model_dump()

    async def finish_session(self, session_id: str, tenant: Tenant, body: FinishRequest | None = None) -> dict:
        """The client is done: its training models and samplers are unloaded everywhere."""
        ids.check_id(session_id, "session_id")
        reason, detail = (body.reason_type(), body.detail) if body is not None else (None, None)
        await self._tenancy.run(self._registry.finish_session, tenant, session_id, reason, detail)
        await self._release_session(tenant, session_id)
        return {}

    async def _release_session(self, tenant: str, session_id: str) -> None:
        """A finished session's training models unloaded and samplers removed, everywhere."""
        await asyncio.gather(*(h.release_session.remote(session_id) for h in self._models.all()))
        for run_id in await self._tenancy.run(self._registry.live_runs, tenant, session_id):
            await self._tenancy.run(self._registry.unload_run, run_id)
        for sampler_id in await self._tenancy.run(self._registry.live_samplers, tenant, session_id):
            await self._tenancy.run(self._registry.remove_sampler, sampler_id)

    async def healthz(self) -> dict:
        """At once, whatever the models are doing; each base model's state."""
        states = await self._models.states(HEALTH_WAIT_S, detail=False)
        return wire.HealthResponse(models={m.name: m.state for m in states}).model_dump()

    async def get_server_capabilities(self) -> dict:
        """At once: a model still loading (or failed) is listed with its state, not waited for."""
        return wire.ServerCapabilities.of(await self._models.states(CAPABILITIES_WAIT_S)).model_dump(exclude_none=True)

    # ---- training models -----------------------------------------------------------------------

    async def create_model(self, body: wire.CreateModelRequest, tenant: Tenant) -> dict:
        body.optimizer_config.check()
        self._models.base(body.base_model)  # an unknown base model is a 404 here
        session_id = ids.check_id(body.session_id, "session_id")
        await self._tenancy.run(self._registry.open_session, tenant, session_id)
        model_id = ids.model_id(session_id, body.model_seq_id)
        lora = body.lora_config.to_spec()
        metadata = dict(body.user_metadata or {})
        self._limits.check_metadata("user_metadata", metadata)
        await self._tenancy.record_run(tenant, model_id, session_id, body.base_model, lora, metadata)
        work = CreateModelWork(model_id, lora, metadata, tenant)
        return await self._submit("create_model", tenant, model_id, body.base_model, "create_model", work)

    async def get_info(self, body: wire.ModelIdRequest, tenant: Tenant) -> dict:
        handle = await self._models.of_model(tenant, body.model_id)
        return wire.GetInfoResponse.of(await handle.get_info.remote(body.model_id)).model_dump()

    async def unload_model(self, body: wire.ModelIdRequest, tenant: Tenant) -> dict:
        base = await self._models.base_of_model(tenant, body.model_id)
        await self._tenancy.run(self._registry.unload_run, body.model_id)
        return await self._submit("unload_model", tenant, body.model_id, base, "unload_model", body.model_id)

    async def forward_backward(self, body: bytes, tenant: str) -> dict:
        """The SDK's protobuf forward_backward (the ingress routes JSON bodies to the simple routes).
        NOTE: decoding runs in a thread: a large body must not hold up the event loop."""
        msg = await asyncio.to_thread(wire_proto.parse_forward_backward, body)
        base = await self._models.base_of_model(tenant, msg.model_id)
        handle, model = self._models.base(base), await self._models.describe(base)
        limits = self._config.limits
        try:
            work = await asyncio.to_thread(wire_proto.to_work, msg, False, limits.max_datums, limits.max_topk)
            self._limits.check_forward_backward(work, model)
            session_id = ids.session_of(msg.model_id)
            if work.loss_fn == "stable_reinforce":  # its sampler log-probs come from this server's records
                spans = await asyncio.to_thread(wire_proto.spans_of, msg)
                await self._tenancy.run(self._sequences.resolve, tenant, session_id, work.data, spans)
            elif work.loss_fn == CUSTOM:  # the uploaded loss travels with the request (and its log entry)
                loss_id = work.loss_fn_config.pop("loss_id", None)
                work.custom_loss = await self._tenancy.run(self._custom_losses.get, tenant, session_id, loss_id)
        except UserError as exc:
            return await self._reject(handle, tenant, msg.model_id, msg.seq_id or None, "forward_backward", exc)
        work.tenant = tenant
        return await self._submit("forward_backward", tenant, msg.model_id, base, "forward_backward", work)

    async def create_custom_loss(self, body: wire.CreateCustomLossRequest, tenant: Tenant) -> dict:
        """The SDK's traced loss graph, checked against the allow-list and kept for the session's
        forward_backward(loss_fn="custom"); a future of {loss_id}, failed (user) if the graph is refused."""
        session_id = ids.check_id(body.session_id, "session_id")
        await self._tenancy.run(self._registry.open_session, tenant, session_id)
        args = (tenant, session_id, body.custom_loss_seq_id, body.name, body.inputs, body.graph)
        try:
            outcome = await self._tenancy.run(self._custom_losses.create, *args)
        except UserError as exc:
            outcome = exc
        request_id = await self._futures.settled("create_custom_loss", tenant, outcome)
        return wire.UntypedAPIFuture(request_id=request_id).model_dump(exclude_none=True)

    async def optim_step(self, body: wire.OptimStepRequest, tenant: Tenant) -> dict:
        base = await self._models.base_of_model(tenant, body.model_id)
        try:
            work = OptimStepWork(body.model_id, body.seq_id, body.adam_params.to_work(), tenant)
        except UserError as exc:
            return await self._reject(self._models.base(base), tenant, body.model_id, body.seq_id, "optim_step", exc)
        return await self._submit("optim_step", tenant, body.model_id, base, "optim_step", work)

    # ---- weights -------------------------------------------------------------------------------

    async def save_weights(self, body: wire.SaveWeightsRequest, tenant: Tenant) -> dict:
        base = await self._models.base_of_model(tenant, body.model_id)
        handle = self._models.base(base)
        name = body.path or f"step-{body.seq_id or 0:06d}"
        try:
            ids.check_name(name)
        except UserError as exc:
            return await self._reject(handle, tenant, body.model_id, body.seq_id, "save_weights", exc)
        try:
            self._limits.check_metadata("user_metadata", body.user_metadata)
        except UserError as exc:
            return await self._reject(handle, tenant, body.model_id, body.seq_id, "save_weights", exc)
        args = (body.model_id, body.seq_id, name, tenant, body.ttl_seconds, body.user_metadata, body.overwrite)
        return await self._submit("save_weights", tenant, body.model_id, base, "save_weights", *args)

    async def save_weights_external(self, body: wire.SaveWeightsExternalRequest, tenant: Tenant) -> dict:
        """A PEFT folder to download (cookbook `weights.download`), ordered with the model's requests."""
        base = await self._models.base_of_model(tenant, body.model_id)
        recipients = tuple(body.age_encryption_recipients or ())
        try:
            ids.check_name(body.path)
            parse_recipients(list(recipients))  # a bad key fails here, before the model's turn
        except UserError as exc:
            handle = self._models.base(base)
            return await self._reject(handle, tenant, body.model_id, body.seq_id, "save_weights_external", exc)
        args = (body.model_id, body.seq_id, body.path, tenant, body.ttl_seconds, recipients)
        return await self._submit("save_weights_external", tenant, body.model_id, base, "save_weights_external", *args)

    async def save_weights_for_sampler(self, body: wire.SaveWeightsForSamplerRequest, tenant: Tenant) -> dict:
        base = await self._models.base_of_model(tenant, body.model_id)
        handle = self._models.base(base)
        run = await self._tenancy.run(self._registry.run, tenant, body.model_id)
        sampler_id = None
        try:
            self._limits.check_metadata("user_metadata", body.user_metadata)
            if body.path is not None:
                ids.check_name(body.path)
            elif body.sampling_session_seq_id is None:
                raise UserError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
            else:
                session = run.session_id or body.model_id  # a simple route's adapter is its own session
                sampler_id = ids.sampler_id(session, body.sampling_session_seq_id)
                await self._tenancy.check_sampler_quota(tenant)
                await self._tenancy.run(
                    self._registry.add_sampler, tenant, sampler_id, run.session_id, run.base_model, None, run.id
                )
        except UserError as exc:
            return await self._reject(handle, tenant, body.model_id, body.seq_id, "save_weights_for_sampler", exc)
        args = (body.model_id, body.seq_id, body.path, sampler_id, tenant, body.ttl_seconds, body.user_metadata)
        return await self._submit(
            "save_weights_for_sampler", tenant, body.model_id, base, "save_weights_for_sampler", *args
        )

    async def load_weights(self, body: wire.LoadWeightsRequest, tenant: Tenant) -> dict:
        if body.optimizer_config is not None:
            body.optimizer_config.check()
        run_id, segment, name = parse_tinker_path(body.path)
        checkpoint = await self._tenancy.run(self._registry.readable_checkpoint, tenant, run_id, segment, name)
        if body.model_id is not None:  # into an existing training model (load_state)
            base = await self._models.base_of_model(tenant, body.model_id)
            args = (body.model_id, body.seq_id, body.path, body.optimizer, tenant)
            meta = {"path": body.path, "loaded": body.model_id}
            return await self._submit("load_weights", tenant, body.model_id, base, "load_weights", *args, **meta)
        if body.session_id is None or body.model_seq_id is None:
            raise UserError("load_weights needs a model_id, or a session_id and model_seq_id")
        session_id = ids.check_id(body.session_id, "session_id")
        await self._tenancy.run(self._registry.open_session, tenant, session_id)
        base_model = body.base_model or checkpoint.base_model
        self._models.base(base_model)  # an unknown base model is a 404 here
        model_id = ids.model_id(session_id, body.model_seq_id)
        metadata = dict(body.user_metadata or checkpoint.user_metadata or {})
        await self._tenancy.record_run(tenant, model_id, session_id, base_model, LoraSpec(**checkpoint.lora), metadata)
        work = CreateModelWork(model_id, LoraSpec(**checkpoint.lora), metadata, tenant)
        args = (work, body.path, body.optimizer)
        meta = {"path": body.path, "loaded": model_id}
        return await self._submit(
            "load_weights", tenant, model_id, base_model, "create_model_from_state", *args, **meta
        )

    # ---- sampling ------------------------------------------------------------------------------

    async def create_sampling_session(self, body: wire.CreateSamplingSessionRequest, tenant: Tenant) -> dict:
        session_id = ids.check_id(body.session_id, "session_id")
        await self._tenancy.run(self._registry.open_session, tenant, session_id)
        if body.model_path is not None:  # the path wins when both are given
            run_id, segment, name = parse_tinker_path(body.model_path)
            checkpoint = await self._tenancy.run(self._registry.readable_checkpoint, tenant, run_id, segment, name)
            base_model = checkpoint.base_model
        elif body.base_model is not None:
            base_model = body.base_model
        else:
            raise UserError("create_sampling_session needs a base_model or a model_path")
        handle = self._models.base(base_model)
        sampler_id = ids.sampler_id(session_id, body.sampling_session_seq_id)
        await self._tenancy.check_sampler_quota(tenant)
        await self._tenancy.run(self._registry.add_sampler, tenant, sampler_id, session_id, base_model, body.model_path)
        await handle.create_sampler.remote(sampler_id, body.model_path, tenant)
        return wire.CreateSamplingSessionResponse(sampling_session_id=sampler_id).model_dump()

    async def get_sampler(self, sampler_id: str, tenant: Tenant) -> dict:
        info = await (await self._models.of_sampler(tenant, sampler_id)).sampler_info.remote(sampler_id)
        return wire.GetSamplerResponse(
            sampler_id=info.sampler_id, base_model=info.base_model, model_path=info.model_path
        ).model_dump(exclude_none=True)

    async def asample(self, body: wire.SampleRequest, tenant: Tenant) -> dict:
        sampler_id = body.sampling_session_id or body.base_model
        if sampler_id is None:
            raise UserError("asample needs a sampling_session_id (or a base_model)")
        if option := body.unsupported():
            raise UserError(f"sampling option {option} is not supported by this server")
        prompt = body.prompt.tokens()
        last_n = body.prompt_logprobs_last_n
        if last_n is not None and not (body.prompt_logprobs and 1 <= last_n <= len(prompt) - 1):
            raise UserError("prompt_logprobs_last_n needs prompt_logprobs and must be in [1, len(prompt) - 1]")
        target, layout = None, None
        if body.target_prompt_logprobs is not None:
            target, layout = wire.target_prompt_ids(body.target_prompt_logprobs, len(prompt))
        base = await self._models.base_of_sampler(tenant, sampler_id)
        handle, model = self._models.base(base), await self._models.describe(base)
        params = body.sampling_params
        stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
        self._limits.check_sample(
            body.num_samples, params.max_tokens, len(prompt), body.topk_prompt_logprobs, len(stops), model
        )
        work = SampleWork(
            sampler_id=sampler_id,
            seq_id=body.seq_id,
            prompt=prompt,
            num_samples=body.num_samples,
            params=body.sampling_params.to_work(),
            prompt_logprobs=bool(body.prompt_logprobs),
            topk_prompt_logprobs=body.topk_prompt_logprobs,
            tenant=tenant,
            record_stability=bool(body.record_stability_info),
            target_prompt_ids=target,
            target_prompt_layout=layout,
        )
        call = partial(deployment_call, handle, "sample", work)
        logged = LoggedCall(None, None, "sample", (work,)) if self._config.durable_training else None
        clone = (body.seq_id or 0) // CLONE_STRIDE  # a sampling client's clone numbers its seq_ids from clone * 1e9
        target = _sampling_target(sampler_id, clone) if body.sampling_session_id is not None else None
        if (session_id := ids.session_of(sampler_id)) is not None:
            await self._seen(tenant, session_id)
        request_id = await self._futures.submit("sample", tenant, base, call, logged, target, last_n=last_n)
        ids_ = [f"{request_id}:{i}" for i in range(body.num_samples)]
        return wire.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids_).model_dump(exclude_none=True)

    # ---- futures -------------------------------------------------------------------------------

    async def cancel_future(self, body: wire.RetrieveFutureRequest, tenant: Tenant) -> dict:
        """The client gave up on a sample: its generation stops and its future fails (a user error).
        Other kinds of request, and finished ones, are left alone (any 2xx, as the SDK expects)."""
        record = await self._futures.record(tenant, body.request_id)  # unknown or another tenant's: 404
        if record.kind == "sample" and record.status == "pending" and record.base_model is not None:
            await self._models.base(record.base_model).cancel.remote(body.request_id)
        return {}

    async def retrieve_futures(self, body: wire.RetrieveFuturesRequest, tenant: Tenant) -> dict:
        """The sampling client's completions after its cursor (finished or failed samples of one
        clone), long-polled; the payloads are then fetched with retrieve_future. Results the client
        reports as retrieved stay until their futures expire, like every other result."""
        sampler_id = ids.check_id(body.target.sampling_session_id, "sampling_session_id")
        await self._tenancy.run(self._registry.sampler, tenant, sampler_id)  # another tenant's: 404
        wait = RETRIEVE_FUTURES_WAIT_S if body.timeout is None else min(body.timeout, RETRIEVE_FUTURES_WAIT_S)
        target = _sampling_target(sampler_id, body.target.cloned_sampler_id)
        found = await self._futures.completions(tenant, target, body.prev_cursor, wait)
        completions = [
            wire.FutureCompletion(state="finished" if status == "done" else "failed", request_id=request_id)
            for _, request_id, status in found
        ]
        cursor = found[-1][0] if found else body.prev_cursor
        return wire.RetrieveFuturesResponse(completions=completions, cursor=cursor).model_dump()

    async def join_sampling_session(self, body: wire.JoinSamplingSessionRequest, tenant: Tenant) -> dict:
        """A sampling client rebuilt elsewhere (unpickled, from a handle) gets its own clone number."""
        sampler_id = ids.check_id(body.sampling_session_id, "sampling_session_id")
        counter = await self._tenancy.run(self._registry.join_sampler, tenant, sampler_id)
        return wire.JoinSamplingSessionResponse(client_counter=counter).model_dump()

    async def retrieve_future(self, body: wire.RetrieveFutureRequest, tenant: Tenant) -> Response:
        done, value, failure, entry = await self._futures.poll(body.request_id, tenant, self._config.long_poll_s)
        if not done:
            return JSONResponse(wire.TryAgainResponse(request_id=body.request_id).model_dump(), status_code=408)
        if failure is not None:  # the SDK reads a failed future from a 200 (RequestFailedResponse)
            return JSONResponse(failure[1])
        if entry.kind in ("forward_backward", "sample"):  # NOTE: large bodies are encoded off the event loop
            return await asyncio.to_thread(encode_result, entry.kind, value, entry.meta)
        return encode_result(entry.kind, value, entry.meta)

    # ---- helpers -------------------------------------------------------------------------------

    async def _submit(
        self, kind: str, tenant: str, model_id: str, base: str, verb: str, *args: Any, **meta: Any
    ) -> dict:
        """Record the request (in the model's request log, run again if the deployment restarts) and
        start `verb(*args)` on the deployment of `base`; its future's id."""
        if (session_id := ids.session_of(model_id)) is not None:
            await self._seen(tenant, session_id)
        call = partial(deployment_call, self._models.base(base), verb, *args)
        logged = LoggedCall(model_id, _seq_of(args), verb, args) if self._config.durable_training else None
        request_id = await self._futures.submit(kind, tenant, base, call, logged, **meta)
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(exclude_none=True)

    async def _reject(
        self, handle: Any, tenant: str, model_id: str, seq_id: int | None, kind: str, exc: UserError
    ) -> dict:
        """Accept the submission but fail its future, and free its seq_id for later requests."""
        if seq_id is not None:
            await handle.skip.remote(model_id, seq_id)
        request_id = await self._futures.fail(kind, tenant, exc)
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(exclude_none=True)


def _sampling_target(sampler_id: str, clone: int) -> str:
    """Which retrieve_futures poller reports a sample: its sampling session and clone."""
    return f"{sampler_id}#{clone}"


def _seq_of(args: tuple) -> int | None:
    """The seq_id of a model actor call: its work's, 0 for a model's creation (its first request),
    or the second argument of save_* / load_weights (model_id, seq_id, ...)."""
    first = args[0] if args else None
    if hasattr(first, "seq_id"):
        return first.seq_id
    if hasattr(first, "lora"):
        return 0
    return args[1] if len(args) > 1 and isinstance(args[1], int) and not isinstance(args[1], bool) else None
