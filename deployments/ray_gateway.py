"""The Ray-native client's end in the cluster: one small actor per `connect()`, holding a Serve
handle to the app's ingress deployment and calling its routes through `Ingress.call_route`.

- Runs on the cluster even when the notebook is attached with `ray.init("ray://...")`: Serve
  handles need a full Ray worker, which a Ray client driver is not.
- `run` submits a request and long-polls its future (as the SDK does over HTTP); the result comes
  back decoded into the SDK's own types, a failed future as the SDK's `RequestFailedError`.
- A refused submission raises the Thinker error its status stands for (`exception_of`).
- A call that fails in transit (an ingress replica replaced) is sent again: every verb it carries
  is safe to repeat (seq_ids make training and sampling requests idempotent in the model actor).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from ray.exceptions import RayActorError, RaySystemError

from configs.errors import ServerError
from deployments.errors import exception_of

logger = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
TRANSIT_TRIES = 4  # a route call lost in transit (replica restarting) is sent this many times in all
TRANSIT_BACKOFF_S = 0.5


class Gateway:
    def __init__(self, app_name: str, api_key: str | None):
        from ray import serve

        self._ingress = serve.get_app_handle(app_name)
        self._api_key = api_key
        self._headers = {"x-api-key": api_key} if api_key else {}

    async def tokenizer_files(self, base_model: str) -> dict[str, bytes]:
        return await self._ingress.tokenizer_files.remote(self._api_key, base_model)

    async def request(self, method: str, path: str, payload: Any = None) -> Any:
        """One route: its JSON answer (bytes for protobuf), or the Thinker error it answered with."""
        if isinstance(payload, bytes):
            headers, body = {**self._headers, "content-type": PROTOBUF}, payload
        else:
            headers = {**self._headers, "content-type": "application/json"}
            body = b"" if payload is None else json.dumps(payload).encode()
        answer = await self._call(method, path, headers, body)
        if answer.status >= 400:
            raise exception_of(answer.status, _json_or_text(answer.body))
        return answer.body if PROTOBUF in answer.content_type else json.loads(answer.body)

    async def run(self, path: str, payload: Any, result_type: str) -> Any:
        """Submit to `path`, then wait for the request's future; its result as tinker.types.<result_type>."""
        submitted = await self.request("POST", path, payload)
        return await self.result(submitted["request_id"], result_type)

    async def result(self, request_id: str, result_type: str) -> Any:
        from tinker import RequestFailedError, types
        from tinker.proto.response_conv import deserialize_proto_response
        from tinker.types import RequestErrorCategory

        headers = {**self._headers, "content-type": "application/json", "accept": PROTOBUF}
        body = json.dumps({"request_id": request_id}).encode()
        while True:
            answer = await self._call("POST", "/api/v1/retrieve_future", headers, body)
            if answer.status == 408:  # still running: the route long-polled for us; ask again
                continue
            if answer.status >= 400:
                raise exception_of(answer.status, _json_or_text(answer.body))
            model = getattr(types, result_type)
            if PROTOBUF in answer.content_type:
                return deserialize_proto_response(answer.body, model)
            value = json.loads(answer.body)
            if "error" in value and "category" in value:
                category = RequestErrorCategory(value["category"])
                raise RequestFailedError(value["error"], request_id, category)
            return model.model_validate(value)

    async def _call(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        for attempt in range(1, TRANSIT_TRIES + 1):
            try:
                return await self._ingress.call_route.remote(method, path, headers, body)
            except (RayActorError, RaySystemError) as exc:
                if attempt == TRANSIT_TRIES:
                    raise ServerError(f"the ingress did not answer {path}: {exc}") from exc
                logger.warning("%s lost in transit (%s); sending it again", path, exc)
                await asyncio.sleep(TRANSIT_BACKOFF_S * attempt)
        raise AssertionError("unreachable")


def _json_or_text(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"error": body.decode(errors="replace")[:500]}
