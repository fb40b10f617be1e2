"""Tinker's /api/v1 routes: sessions, training, weights, sampling and futures.

- A submission is decoded and validated here, handed to the model deployment that owns its id,
  and answered at once with a request id whose future is the Ray ref of that call.
- `retrieve_future` long-polls that ref (`long_poll_s`), answering 408 + try_again while it is
  pending; an await never blocks other requests.
- A problem inside a datum fails the request's future (the SDK raises RequestFailedError and
  stays usable) and frees its seq_id; an unusable request is a 4xx `{error, category}`.
"""

import asyncio
from typing import Any

from fastapi.responses import JSONResponse, Response

from actors import ids
from actors.checkpoint_store import CheckpointStore, parse_tinker_path
from actors.work import CreateModelWork, OptimStepWork, SampleWork
from configs.errors import UserError
from configs.schema import ThinkerConfig
from deployments import wire, wire_proto
from deployments.futures import Futures
from deployments.model_handles import ModelHandles

PROTOBUF = "application/x-protobuf"


def encode_result(kind: str, value: Any, meta: dict[str, Any]) -> Response:
    """A finished future's wire form: protobuf for forward_backward and sampling, JSON otherwise."""
    if kind == "forward_backward":
        return Response(wire_proto.encode_forward_backward_output(value), media_type=PROTOBUF)
    if kind == "sample":
        return Response(wire_proto.encode_sample_response(value, meta.get("last_n")), media_type=PROTOBUF)
    bodies = {
        "optim_step": lambda: wire.OptimStepResponse(metrics=value.metrics),
        "create_model": lambda: wire.CreateModelResponse(model_id=value.model_id),
        "unload_model": lambda: wire.UnloadModelResponse(model_id=value),
        "save_weights": lambda: wire.SaveWeightsResponse(path=value),
        "save_weights_for_sampler": lambda: (
            wire.SaveWeightsForSamplerResponse(path=value)
            if value.startswith("tinker://")
            else wire.SaveWeightsForSamplerResponse(sampling_session_id=value)
        ),
        "load_weights": lambda: wire.LoadWeightsResponse(path=meta["path"], model_id=meta["loaded"]),
    }
    if kind not in bodies:
        raise ValueError(f"no encoding for future kind {kind!r}")
    return JSONResponse(bodies[kind]().model_dump(exclude_none=True))


class TinkerRoutes:
    def __init__(
        self,
        models: ModelHandles,
        futures: Futures,
        store: CheckpointStore,
        config: ThinkerConfig,
    ):
        self._models = models
        self._futures = futures
        self._store = store
        self._config = config

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
            ("POST", "/api/v1/save_weights", self.save_weights),
            ("POST", "/api/v1/save_weights_for_sampler", self.save_weights_for_sampler),
            ("POST", "/api/v1/load_weights", self.load_weights),
            ("POST", "/api/v1/create_sampling_session", self.create_sampling_session),
            ("GET", "/api/v1/samplers/{sampler_id}", self.get_sampler),
            ("POST", "/api/v1/asample", self.asample),
            ("POST", "/api/v1/retrieve_future", self.retrieve_future),
        ]

    # ---- sessions and service ------------------------------------------------------------------

    async def client_config(self) -> dict:
        return wire.ClientConfigResponse().model_dump()

    async def dynamic_config(self) -> dict:
        return {}

    async def create_session(self, body: wire.CreateSessionRequest) -> dict:
        return wire.CreateSessionResponse(session_id=ids.new_session_id()).model_dump()

    async def session_heartbeat(self, body: wire.SessionRequest) -> dict:
        return wire.HeartbeatResponse().model_dump()

    async def telemetry(self) -> dict:
        return wire.TelemetryResponse().model_dump()

    async def finish_session(self, session_id: str) -> dict:
        """The client is done: its training models and samplers are unloaded everywhere."""
        ids.check_id(session_id, "session_id")
        await asyncio.gather(*(h.release_session.remote(session_id) for h in self._models.all()))
        return {}

    async def healthz(self) -> dict:
        return wire.HealthResponse().model_dump()

    async def get_server_capabilities(self) -> dict:
        return wire.ServerCapabilities.of(await self._models.describe_all()).model_dump()

    # ---- training models -----------------------------------------------------------------------

    async def create_model(self, body: wire.CreateModelRequest) -> dict:
        if body.optimizer_config.type != "adamw":
            raise UserError(f"optimizer {body.optimizer_config.type!r} is not supported; Thinker trains with AdamW")
        handle = self._models.base(body.base_model)
        model_id = ids.model_id(body.session_id, body.model_seq_id)
        work = CreateModelWork(model_id, body.lora_config.to_spec(), dict(body.user_metadata or {}))
        self._models.remember(model_id, body.base_model)
        return await self._submit("create_model", model_id, handle.create_model.remote(work))

    async def get_info(self, body: wire.ModelIdRequest) -> dict:
        handle = await self._models.of_model(body.model_id)
        return wire.GetInfoResponse.of(await handle.get_info.remote(body.model_id)).model_dump()

    async def unload_model(self, body: wire.ModelIdRequest) -> dict:
        handle = await self._models.of_model(body.model_id)
        return await self._submit("unload_model", body.model_id, handle.unload_model.remote(body.model_id))

    async def forward_backward(self, body: bytes) -> dict:
        """The SDK's protobuf forward_backward (the ingress routes JSON bodies to the simple routes)."""
        msg = wire_proto.parse_forward_backward(body)
        handle = await self._models.of_model(msg.model_id)
        try:
            work = wire_proto.to_work(msg, forward_only=False)
        except UserError as exc:
            return await self._reject(handle, msg.model_id, msg.seq_id or None, "forward_backward", exc)
        return await self._submit("forward_backward", msg.model_id, handle.forward_backward.remote(work))

    async def optim_step(self, body: wire.OptimStepRequest) -> dict:
        handle = await self._models.of_model(body.model_id)
        try:
            work = OptimStepWork(body.model_id, body.seq_id, body.adam_params.to_work())
        except UserError as exc:
            return await self._reject(handle, body.model_id, body.seq_id, "optim_step", exc)
        return await self._submit("optim_step", body.model_id, handle.optim_step.remote(work))

    # ---- weights -------------------------------------------------------------------------------

    async def save_weights(self, body: wire.SaveWeightsRequest) -> dict:
        handle = await self._models.of_model(body.model_id)
        name = body.path or f"step-{body.seq_id or 0:06d}"
        try:
            ids.check_name(name)
        except UserError as exc:
            return await self._reject(handle, body.model_id, body.seq_id, "save_weights", exc)
        call = handle.save_weights.remote(body.model_id, body.seq_id, name)
        return await self._submit("save_weights", body.model_id, call)

    async def save_weights_for_sampler(self, body: wire.SaveWeightsForSamplerRequest) -> dict:
        handle = await self._models.of_model(body.model_id)
        sampler_id = None
        if body.path is None:
            if body.sampling_session_seq_id is None:
                exc = UserError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
                return await self._reject(handle, body.model_id, body.seq_id, "save_weights_for_sampler", exc)
            session = ids.session_of(body.model_id) or body.model_id  # a simple route's adapter: its own session
            sampler_id = ids.sampler_id(session, body.sampling_session_seq_id)
            self._models.remember(sampler_id, await self._models.base_name_of_model(body.model_id))
        call = handle.save_weights_for_sampler.remote(body.model_id, body.seq_id, body.path, sampler_id)
        return await self._submit("save_weights_for_sampler", body.model_id, call)

    async def load_weights(self, body: wire.LoadWeightsRequest) -> dict:
        if body.model_id is not None:  # into an existing training model (load_state)
            handle = await self._models.of_model(body.model_id)
            call = handle.load_weights.remote(body.model_id, body.seq_id, body.path, body.optimizer)
            return await self._submit("load_weights", body.model_id, call, path=body.path, loaded=body.model_id)
        if body.session_id is None or body.model_seq_id is None:
            raise UserError("load_weights needs a model_id, or a session_id and model_seq_id")
        record = await asyncio.to_thread(self._store.record, body.path)
        base_model = body.base_model or record.base_model
        handle = self._models.base(base_model)
        model_id = ids.model_id(body.session_id, body.model_seq_id)
        self._models.remember(model_id, base_model)
        call = handle.create_model_from_state.remote(model_id, body.path, body.optimizer, body.user_metadata or {})
        return await self._submit("load_weights", model_id, call, path=body.path, loaded=model_id)

    # ---- sampling ------------------------------------------------------------------------------

    async def create_sampling_session(self, body: wire.CreateSamplingSessionRequest) -> dict:
        if body.model_path is not None:  # the path wins when both are given
            parse_tinker_path(body.model_path)
            base_model = (await asyncio.to_thread(self._store.record, body.model_path)).base_model
        elif body.base_model is not None:
            base_model = body.base_model
        else:
            raise UserError("create_sampling_session needs a base_model or a model_path")
        sampler_id = ids.sampler_id(body.session_id, body.sampling_session_seq_id)
        await self._models.base(base_model).create_sampler.remote(sampler_id, body.model_path)
        self._models.remember(sampler_id, base_model)
        return wire.CreateSamplingSessionResponse(sampling_session_id=sampler_id).model_dump()

    async def get_sampler(self, sampler_id: str) -> dict:
        info = await (await self._models.of_sampler(sampler_id)).sampler_info.remote(sampler_id)
        return wire.GetSamplerResponse(
            sampler_id=info.sampler_id, base_model=info.base_model, model_path=info.model_path
        ).model_dump(exclude_none=True)

    async def asample(self, body: wire.SampleRequest) -> dict:
        sampler_id = body.sampling_session_id or body.base_model
        if sampler_id is None:
            raise UserError("asample needs a sampling_session_id (or a base_model)")
        if option := body.unsupported():
            raise UserError(f"sampling option {option} is not supported by this server")
        prompt = body.prompt.tokens()
        last_n = body.prompt_logprobs_last_n
        if last_n is not None and not (body.prompt_logprobs and 1 <= last_n <= len(prompt) - 1):
            raise UserError("prompt_logprobs_last_n needs prompt_logprobs and must be in [1, len(prompt) - 1]")
        handle = await self._models.of_sampler(sampler_id)
        work = SampleWork(
            sampler_id=sampler_id,
            seq_id=body.seq_id,
            prompt=prompt,
            num_samples=body.num_samples,
            params=body.sampling_params.to_work(),
            prompt_logprobs=bool(body.prompt_logprobs),
            topk_prompt_logprobs=body.topk_prompt_logprobs,
        )
        request_id = await self._futures.submit("sample", handle.sample.remote(work), last_n=last_n)
        ids = [f"{request_id}:{i}" for i in range(body.num_samples)]
        return wire.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids).model_dump(exclude_none=True)

    # ---- futures -------------------------------------------------------------------------------

    async def retrieve_future(self, body: wire.RetrieveFutureRequest) -> Response:
        done, value, failure, entry = await self._futures.poll(body.request_id, self._config.long_poll_s)
        if not done:
            return JSONResponse(wire.TryAgainResponse(request_id=body.request_id).model_dump(), status_code=408)
        if failure is not None:  # the SDK reads a failed future from a 200 (RequestFailedResponse)
            return JSONResponse(failure[1])
        return encode_result(entry.kind, value, entry.meta)

    # ---- helpers -------------------------------------------------------------------------------

    async def _submit(self, kind: str, model_id: str, response: Any, **meta: Any) -> dict:
        request_id = await self._futures.submit(kind, response, **meta)
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(exclude_none=True)

    async def _reject(self, handle: Any, model_id: str, seq_id: int | None, kind: str, exc: UserError) -> dict:
        """Accept the submission but fail its future, and free its seq_id for later requests."""
        if seq_id is not None:
            await handle.skip.remote(model_id, seq_id)
        request_id = self._futures.fail(kind, exc)
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(exclude_none=True)
