"""The HTTP ingress deployment: Tinker's /api/v1 routes, the REST checkpoint routes and the
original server's simple JSON routes, on one FastAPI app per replica.

- Each replica builds its app at start (`__serve_build_asgi_app__`) from its route groups, whose
  endpoints are bound methods sharing the replica's model handles, futures and checkpoint store.
- NOTE: nothing here may import torch: replicas stay light and start fast.
"""

from typing import Any, NamedTuple

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.checkpoint_store import CheckpointStore
from actors.metadata.futures import FutureRecords
from configs.errors import RequestTooLargeError, ThinkerError, UserError
from configs.schema import ThinkerConfig
from deployments.account_routes import AccountRoutes
from deployments.checkpoint_routes import CheckpointRoutes
from deployments.errors import error_response
from deployments.futures import Futures
from deployments.model_handles import ModelHandles
from deployments.session_routes import SessionRoutes
from deployments.simple_routes import SimpleRoutes
from deployments.tenancy import PUBLIC_PATHS, PUBLIC_PREFIXES, Tenancy, Tenant
from deployments.tinker_routes import TinkerRoutes

REPLICA_HEADER = "x-thinker-replica"  # which ingress replica answered (debugging, tests)


class RouteAnswer(NamedTuple):
    """A route's answer to `Ingress.call_route`: its HTTP status, content type and body."""

    status: int
    content_type: str
    body: bytes


def build_api(route_groups: list[Any], tenancy: Tenancy, max_request_bytes: int, replica_id: str) -> FastAPI:
    api = FastAPI(title="Thinker", description="A self-hosted Tinker-compatible post-training service")

    @api.exception_handler(ThinkerError)
    async def _thinker_error(request: Request, exc: ThinkerError) -> JSONResponse:
        status, body = error_response(exc)
        return JSONResponse(body, status_code=status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, method, an unreadable body): our error shape, its status."""
        error = RequestTooLargeError(str(exc.detail)) if exc.status_code == 413 else UserError(str(exc.detail))
        status, body = error_response(error)
        return JSONResponse(body, status_code=exc.status_code if 400 <= exc.status_code < 500 else status)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        status, body = error_response(UserError(f"invalid request: {problems}"))
        return JSONResponse(body, status_code=status)

    for group in route_groups:
        for method, path, endpoint in group.routes():
            api.add_api_route(path, endpoint, methods=[method])
    api.add_middleware(Admission, tenancy=tenancy, max_bytes=max_request_bytes, replica_id=replica_id)
    return api


class Admission:
    """ASGI middleware in front of every route: refuses a body over the limit (by its declared
    length, and by counting as it arrives, so chunked bodies too), finds the caller's tenant
    (401 without a usable key) and tags each answer with the replica that gave it.

    NOTE: a plain ASGI class, not `@app.middleware`: that one runs the route in a task group,
    which would turn the 413 raised while the route reads its body into a bare 500."""

    def __init__(self, app, tenancy: Tenancy, max_bytes: int, replica_id: str):
        self._app = app
        self._tenancy = tenancy
        self._max_bytes = max_bytes
        self._replica_id = replica_id.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def tagged_send(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self._replica_id)]
            await send(message)

        request = Request(scope)
        try:
            length = request.headers.get("content-length", "")
            if length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > self._max_bytes):
                raise RequestTooLargeError(f"request body of {length} bytes exceeds {self._max_bytes}")
            path = _route_path(request)
            if path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
                tenant = await self._tenancy.authenticate(request.headers.get("x-api-key"))
                scope.setdefault("state", {})["tenant"] = tenant
        except ThinkerError as exc:
            status, body = error_response(exc)
            await JSONResponse(body, status_code=status)(scope, receive, tagged_send)
            return
        await self._app(scope, self._counting(receive), tagged_send)

    def _counting(self, receive):
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max_bytes:  # FastAPI passes an HTTPException on to our handler
                    raise StarletteHTTPException(413, f"request body exceeds {self._max_bytes} bytes")
            return message

        return counted_receive


class ForwardBackwardByContentType:
    """POST /api/v1/forward_backward: the SDK's protobuf body goes to the Tinker routes, a JSON
    body (the original server's chat data) to the simple routes."""

    def __init__(self, tinker: TinkerRoutes, simple: SimpleRoutes, max_request_bytes: int):
        self._tinker = tinker
        self._simple = simple
        self._max_request_bytes = max_request_bytes

    def routes(self) -> list[tuple[str, str, Any]]:
        return [("POST", "/api/v1/forward_backward", self.forward_backward)]

    async def forward_backward(self, request: Request, tenant: Tenant) -> dict:
        body = await request.body()
        if len(body) > self._max_request_bytes:
            raise RequestTooLargeError(f"request body of {len(body)} bytes exceeds {self._max_request_bytes}")
        if request.headers.get("content-encoding", "identity") != "identity":
            raise UserError("compressed forward_backward bodies are not supported (proto_compress_fwdbwd is off)")
        if "json" in request.headers.get("content-type", ""):
            return await self._simple.forward_backward_json(body, tenant)
        return await self._tinker.forward_backward(body, tenant)


@serve.ingress()
class Ingress:
    """One HTTP ingress replica: decodes and validates, hands work to the model deployments and
    answers at once with a request id. Holds no training state (any replica answers any request)
    and never imports torch."""

    def __init__(self, models: dict[str, Any], config: ThinkerConfig):
        self._tenancy = Tenancy(config)
        self._tenancy.warn_if_exposed(_http_host())
        handles = self._handles = ModelHandles(models, self._tenancy)
        futures = Futures(FutureRecords(self._tenancy.database, config.future_ttl_s), handles.base)
        self._config = config
        self._api: FastAPI | None = None
        self._in_process: httpx.AsyncClient | None = None  # call_route's client of this replica's app
        tinker = TinkerRoutes(handles, futures, self._tenancy, config)
        simple = SimpleRoutes(handles, futures, self._tenancy, config)
        forward_backward = ForwardBackwardByContentType(tinker, simple, config.max_request_bytes)
        store = CheckpointStore(config.checkpoint_root)
        self._groups = [
            tinker,
            forward_backward,
            CheckpointRoutes(self._tenancy, store),
            SessionRoutes(self._tenancy),
            AccountRoutes(self._tenancy),
            simple,
        ]

    def __serve_build_asgi_app__(self) -> FastAPI:
        if self._api is None:
            replica_id = serve.get_replica_context().replica_id.unique_id
            self._api = build_api(self._groups, self._tenancy, self._config.max_request_bytes, replica_id)
        return self._api

    async def call_route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> RouteAnswer:
        """One route of this app called through a Serve handle, not the HTTP proxy (the Ray-native
        client, deployments/ray_client.py): the same ASGI app answers, with its admission (key,
        size), validation and error shapes, so both paths keep one set of rules."""
        if self._in_process is None:  # one per replica: a client per call would build an SSL context each time
            app = self.__serve_build_asgi_app__()  # an exception a route does not handle is a 500, as over HTTP
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("ray-client", 0))
            self._in_process = httpx.AsyncClient(transport=transport, base_url="http://thinker.ray-client")
        answer = await self._in_process.request(method, path, headers=headers, content=body)
        return RouteAnswer(answer.status_code, answer.headers.get("content-type", ""), answer.content)

    async def tokenizer_files(self, api_key: str | None, base_model: str) -> dict[str, bytes]:
        """A base model's tokenizer files for the Ray-native client (any tenant the key admits)."""
        await self._tenancy.authenticate(api_key)
        return await self._handles.base(base_model).tokenizer_files.remote()


def _route_path(request: Request) -> str:
    """The path within the app (Serve may mount the app under a route prefix)."""
    root = request.scope.get("root_path", "")
    path = request.url.path
    return path[len(root) :] if root and path.startswith(root) else path


def _http_host() -> str | None:
    """The host Serve's HTTP proxies bind, if Serve says (only used for a warning)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # an older or newer Serve without this (private) client: no warning
        return None
