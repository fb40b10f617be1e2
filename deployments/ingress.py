"""The HTTP ingress: Tinker's /api/v1 routes on FastAPI, served by Ray Serve.

- A submission is decoded and validated here, handed to the model deployment of its base
  model, and answered at once with a request id whose future is the Ray ref of that call.
- `retrieve_future` long-polls that ref (`long_poll_s`), answering 408 + try_again while it is
  pending; an await never blocks other requests.
- User errors are 4xx with `{error, category}`; a datum that cannot be decoded fails its
  future instead (the SDK raises RequestFailedError and stays usable).
- NOTE: this module must not import torch: replicas stay light and start fast.
"""

import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from actors.work import CreateModelWork, ModelDescription, OptimStepWork
from configs.errors import NotFoundError, RequestTooLargeError, ThinkerError, UserError
from configs.schema import ThinkerConfig
from deployments import wire, wire_proto
from deployments.errors import error_response
from deployments.futures import FutureEntry, Futures, new_request_id, wait_ref

logger = logging.getLogger(__name__)
PROTOBUF = "application/x-protobuf"
REPLICA_HEADER = "x-thinker-replica"  # which ingress replica answered (debugging, tests)


def encode_result(kind: str, value: Any) -> Response:
    """A finished future's wire form: protobuf for forward_backward, JSON otherwise."""
    if kind == "forward_backward":
        return Response(wire_proto.encode_forward_backward_output(value), media_type=PROTOBUF)
    if kind == "optim_step":
        body = wire.OptimStepResponse(metrics=value.metrics)
    elif kind == "create_model":
        body = wire.CreateModelResponse(model_id=value.model_id)
    elif kind == "unload_model":
        body = wire.UnloadModelResponse(model_id=value)
    else:
        raise ValueError(f"no encoding for future kind {kind!r}")
    return JSONResponse(body.model_dump())


def build_api(ingress: "Ingress", max_request_bytes: int, replica_id: str) -> FastAPI:
    """The FastAPI app of one ingress replica: its routes are the replica's bound methods."""
    api = FastAPI(title="Thinker", description="A self-hosted Tinker-compatible post-training service")

    @api.exception_handler(ThinkerError)
    async def _thinker_error(request: Request, exc: ThinkerError) -> JSONResponse:
        status, body = error_response(exc)
        return JSONResponse(body, status_code=status)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}", "category": "user"}, status_code=400)

    @api.middleware("http")
    async def _limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_request_bytes:
            status, body = error_response(
                RequestTooLargeError(f"request body of {length} bytes exceeds {max_request_bytes}")
            )
            response = JSONResponse(body, status_code=status)
        else:
            response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica_id
        return response

    for method, path, endpoint in ingress.routes():
        api.add_api_route(path, endpoint, methods=[method])
    return api


@serve.ingress()
class Ingress:
    def __init__(self, models: dict[str, Any], store: Any, config: ThinkerConfig):
        self._models = models  # base model name -> DeploymentHandle of its ModelActor
        self._config = config
        self._futures = Futures(store, config.future_ttl_s)
        self._model_of: dict[str, str] = {}  # training model id -> base model name
        self._descriptions: dict[str, ModelDescription] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica_id = serve.get_replica_context().replica_id.unique_id
        return build_api(self, self._config.max_request_bytes, replica_id)

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/api/v1/client/config", self.client_config),
            ("POST", "/api/v1/client/dynamic_config", self.dynamic_config),
            ("POST", "/api/v1/create_session", self.create_session),
            ("POST", "/api/v1/session_heartbeat", self.session_heartbeat),
            ("POST", "/api/v1/telemetry", self.telemetry),
            ("POST", "/api/v1/sessions/{session_id}/finish", self.finish_session),
            ("GET", "/api/v1/healthz", self.healthz),
            ("GET", "/api/v1/get_server_capabilities", self.get_server_capabilities),
            ("POST", "/api/v1/create_model", self.create_model),
            ("POST", "/api/v1/get_info", self.get_info),
            ("POST", "/api/v1/unload_model", self.unload_model),
            ("POST", "/api/v1/forward_backward", self.forward_backward),
            ("POST", "/api/v1/optim_step", self.optim_step),
            ("POST", "/api/v1/retrieve_future", self.retrieve_future),
        ]

    # ---- session and service routes ----------------------------------------------------------

    async def client_config(self) -> dict:
        return wire.ClientConfigResponse().model_dump()

    async def dynamic_config(self) -> dict:
        return {}

    async def create_session(self, body: wire.CreateSessionRequest) -> dict:
        return wire.CreateSessionResponse(session_id=str(uuid.uuid4())).model_dump()

    async def session_heartbeat(self, body: wire.SessionRequest) -> dict:
        return wire.HeartbeatResponse().model_dump()

    async def telemetry(self) -> dict:
        return wire.TelemetryResponse().model_dump()

    async def finish_session(self, session_id: str) -> dict:
        """The client is done: its training models are unloaded from every base model."""
        await asyncio.gather(*(h.release_session.remote(session_id) for h in self._models.values()))
        return {}

    async def healthz(self) -> dict:
        return wire.HealthResponse().model_dump()

    async def get_server_capabilities(self) -> dict:
        models = [
            wire.SupportedModel(
                model_name=d.name, max_context_length=d.max_seq_len, trainable=d.trainable, sampleable=d.sampleable
            )
            for d in await self._describe_all()
        ]
        return wire.ServerCapabilities(supported_models=models).model_dump()

    # ---- training models ---------------------------------------------------------------------

    async def create_model(self, body: wire.CreateModelRequest) -> dict:
        if body.optimizer_config.type != "adamw":
            raise UserError(f"optimizer {body.optimizer_config.type!r} is not supported; Thinker trains with AdamW")
        handle = self._base_handle(body.base_model)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        work = CreateModelWork(model_id, body.lora_config.to_spec(), dict(body.user_metadata or {}))
        self._model_of[model_id] = body.base_model
        return await self._submit("create_model", model_id, handle.create_model.remote(work))

    async def get_info(self, body: wire.ModelIdRequest) -> dict:
        handle = await self._model_handle(body.model_id)
        return wire.GetInfoResponse.of(await handle.get_info.remote(body.model_id)).model_dump()

    async def unload_model(self, body: wire.ModelIdRequest) -> dict:
        handle = await self._model_handle(body.model_id)
        return await self._submit("unload_model", body.model_id, handle.unload_model.remote(body.model_id))

    async def forward_backward(self, request: Request) -> dict:
        return await self._forward_backward(request, forward_only=False)

    async def optim_step(self, body: wire.OptimStepRequest) -> dict:
        handle = await self._model_handle(body.model_id)
        try:
            work = OptimStepWork(body.model_id, body.seq_id, body.adam_params.to_work())
        except UserError as exc:
            return await self._reject(handle, body.model_id, body.seq_id, "optim_step", exc)
        return await self._submit("optim_step", body.model_id, handle.optim_step.remote(work))

    # ---- futures -------------------------------------------------------------------------------

    async def retrieve_future(self, body: wire.RetrieveFutureRequest) -> Response:
        entry = await self._futures.find(body.request_id)
        if entry is None:
            raise NotFoundError(f"unknown or expired request_id {body.request_id!r}")
        if entry.failure is not None:
            return JSONResponse(entry.failure)
        done, value, error = await wait_ref(entry.refs[0], self._config.long_poll_s)
        if not done:
            return JSONResponse(wire.TryAgainResponse(request_id=body.request_id).model_dump(), status_code=408)
        if error is not None:
            return JSONResponse(error_response(error)[1])
        return encode_result(entry.kind, value)

    # ---- helpers ---------------------------------------------------------------------------------

    async def _forward_backward(self, request: Request, forward_only: bool) -> dict:
        body = await request.body()
        if len(body) > self._config.max_request_bytes:
            raise RequestTooLargeError(f"request body of {len(body)} bytes exceeds {self._config.max_request_bytes}")
        if request.headers.get("content-encoding", "identity") != "identity":
            raise UserError("compressed forward_backward bodies are not supported (proto_compress_fwdbwd is off)")
        msg = wire_proto.parse_forward_backward(body)
        handle = await self._model_handle(msg.model_id)
        try:
            work = wire_proto.to_work(msg, forward_only)
        except UserError as exc:
            return await self._reject(handle, msg.model_id, msg.seq_id or None, "forward_backward", exc)
        return await self._submit("forward_backward", msg.model_id, handle.forward_backward.remote(work))

    async def _submit(self, kind: str, model_id: str, response: Any) -> dict:
        ref = await response._to_object_ref()
        request_id = new_request_id()
        self._futures.add(request_id, FutureEntry(kind=kind, refs=[ref]))
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump()

    async def _reject(self, handle: Any, model_id: str, seq_id: int | None, kind: str, exc: UserError) -> dict:
        """Accept the submission but fail its future, and free its seq_id for later requests."""
        if seq_id is not None:
            await handle.skip.remote(model_id, seq_id)
        request_id = new_request_id()
        self._futures.add(request_id, FutureEntry(kind=kind, failure=error_response(exc)[1]))
        return wire.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump()

    def _base_handle(self, base_model: str) -> Any:
        handle = self._models.get(base_model)
        if handle is None:
            raise NotFoundError(f"unknown base model {base_model!r}; this server has {sorted(self._models)}")
        return handle

    async def _model_handle(self, model_id: str) -> Any:
        """The deployment hosting a training model (asks every base model on a cache miss)."""
        base = self._model_of.get(model_id)
        if base is None:
            names = list(self._models)
            owns = await asyncio.gather(*(self._models[n].has_model.remote(model_id) for n in names))
            base = next((n for n, yes in zip(names, owns) if yes), None)
            if base is None:
                raise NotFoundError(f"unknown model_id {model_id!r}")
            self._model_of[model_id] = base
        return self._models[base]

    async def _describe_all(self) -> list[ModelDescription]:
        missing = [n for n in self._models if n not in self._descriptions]
        for name, description in zip(
            missing, await asyncio.gather(*(self._models[n].describe.remote() for n in missing))
        ):
            self._descriptions[name] = description
        return [self._descriptions[n] for n in self._models]
