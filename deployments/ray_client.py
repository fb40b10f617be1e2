"""Thinker from a notebook or any Ray driver, with no HTTP: the Tinker verbs as Ray-native calls.

    import ray
    from tinker import types
    from deployments.ray_client import connect

    ray.init("ray://head:10001")                  # or inside the cluster: ray.init()
    service = connect("thinker", api_key=...)     # the Serve app's name; the tenant's key
    model = service.create_lora_training_client("HuggingFaceTB/SmolLM2-135M-Instruct", rank=16)
    out = model.forward_backward(data, "cross_entropy").result()   # or ray.get(...) / await ...
    model.optim_step(types.AdamParams(learning_rate=1e-4)).result()

- Every call returns a `RayFuture` at once: an ObjectRef (`ray.get`, `ray.wait`, `await`) with the
  SDK's `.result()`. Requests and results are the SDK's own types (tinker.types).
- The work is done by a gateway actor in the cluster (deployments/ray_gateway.py) calling the app's
  routes through a Serve handle: admission by key, validation, ordering, de-duplication, errors and
  ownership are those of the HTTP API. A failed request raises tinker.RequestFailedError; a refused
  one the Thinker error of its status (configs/errors.py).
- NOTE: a Ray connection is the whole cluster (any actor, any file, any secret in a worker's
  environment): the key picks whose models these are, it is no wall between people. Ray-client
  access is for the cluster's own operators and teams; strangers use HTTP.
- Requests are numbered here as the SDK numbers them (one seq_id stream per training model), so
  calls may overlap and still run in the order they were made.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import ray
from ray.util.client.common import ClientObjectRef

from configs.errors import AuthenticationError, NotFoundError, UserError
from deployments.ray_gateway import Gateway

DEFAULT_APP = "thinker"
HEARTBEAT_S = 10.0  # as the SDK


class RayFuture(ray.ObjectRef):
    """A request's result: an ObjectRef (ray.get / ray.wait / await) with `.result()`."""

    ref: ray.ObjectRef  # the gateway call's own ref (pass this one into other Ray tasks)

    def result(self, timeout: float | None = None) -> Any:
        """The result; the request's own error (not Ray's wrapper) if it failed."""
        try:
            return ray.get(self.ref, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause or exc) from None

    def __reduce__(self):
        """Into a task or a container, as the plain ref (which Ray's own serializer tracks)."""
        return as_future, (self.ref,)


class ClientRayFuture(ClientObjectRef):
    """RayFuture for a driver attached with the Ray client (whose refs are ClientObjectRefs)."""

    ref: ClientObjectRef
    result = RayFuture.result
    __reduce__ = RayFuture.__reduce__


def as_future(ref: ray.ObjectRef) -> RayFuture:
    """`ref` as a RayFuture: a second ref to the same object, which keeps the first alive."""
    if isinstance(ref, ClientObjectRef):
        future = ClientRayFuture(ref.binary())
    else:
        future = RayFuture(ref.binary(), ref.owner_address(), ref.call_site())
    future.ref = ref
    return future


def connect(
    app_name: str = DEFAULT_APP,
    api_key: str | None = None,
    user_metadata: dict[str, str] | None = None,
    project_id: str | None = None,
) -> ServiceClient:
    """A client of the Serve app `app_name` on the Ray cluster this driver is connected to (call
    `ray.init` first). `api_key` defaults to $TINKER_API_KEY, as in the SDK."""
    if not ray.is_initialized():
        raise RuntimeError('connect() needs a Ray connection: ray.init() in the cluster, ray.init("ray://head:10001")')
    key = api_key if api_key is not None else os.environ.get("TINKER_API_KEY")
    # every call it carries is safe to repeat (seq_ids), so a gateway lost with its node comes back and retries
    gateway = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Gateway).remote(app_name, key)
    return ServiceClient(gateway, user_metadata or {}, project_id)


class ServiceClient:
    """One session of the tenant whose key was given; creates and attaches training and sampling clients."""

    def __init__(self, gateway: Any, user_metadata: dict[str, str], project_id: str | None):
        from tinker import types

        self._gateway = gateway
        body = types.CreateSessionRequest(
            tags=["ray-client"], user_metadata=user_metadata, sdk_version="ray-client", project_id=project_id
        )
        self.session_id: str = self._call("POST", "/api/v1/create_session", _json(body))["session_id"]
        self._model_seq = itertools.count()
        self._sampler_seq = itertools.count()
        self._tokenizers: dict[str, Any] = {}
        self._closed = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._closed), daemon=True)
        beat.name = "thinker-heartbeat"
        beat.start()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        return as_future(self._gateway.request.remote(method, path, payload)).result()

    def get_server_capabilities(self) -> Any:
        from tinker import types

        return types.GetServerCapabilitiesResponse.model_validate(self._call("GET", "/api/v1/get_server_capabilities"))

    def get_tokenizer(self, base_model: str) -> Any:
        """`base_model`'s tokenizer (transformers), from the cluster: the driver needs no model files."""
        from transformers import AutoTokenizer

        if base_model not in self._tokenizers:
            files = as_future(self._gateway.tokenizer_files.remote(base_model)).result()
            folder = Path(tempfile.mkdtemp(prefix="thinker-tokenizer-"))
            for name, content in files.items():
                (folder / Path(name).name).write_bytes(content)
            self._tokenizers[base_model] = AutoTokenizer.from_pretrained(folder)
        return self._tokenizers[base_model]

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
    ) -> TrainingClient:
        """A new LoRA training model on `base_model` (waits for it to be created)."""
        from tinker import types

        lora = types.LoraConfig(
            rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn, train_unembed=train_unembed
        )
        body = types.CreateModelRequest(
            session_id=self.session_id,
            model_seq_id=next(self._model_seq),
            base_model=base_model,
            lora_config=lora,
            user_metadata=user_metadata,
        )
        ref = self._gateway.run.remote("/api/v1/create_model", _json(body), "CreateModelResponse")
        return TrainingClient(self, as_future(ref).result().model_id, base_model, last_seq_id=0)

    def attach_training_client(self, model_id: str) -> TrainingClient:
        """A client of an existing training model of this tenant (e.g. after a notebook's kernel
        restarted): it numbers its requests after the last one the model was sent."""
        info = self._call("POST", "/api/v1/get_info", {"model_id": model_id})
        return TrainingClient(
            self, model_id, info["model_data"]["model_name"], last_seq_id=info.get("last_seq_id") or 0
        )

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """A sampler of a saved adapter (`tinker://.../sampler_weights/...`) or of a base model."""
        body = {
            "session_id": self.session_id,
            "sampling_session_seq_id": next(self._sampler_seq),
            "model_path": model_path,
            "base_model": base_model,
        }
        answer = self._call("POST", "/api/v1/create_sampling_session", body)
        return SamplingClient(self._gateway, answer["sampling_session_id"])

    def close(self) -> None:
        """Finish the session: its training models and samplers are unloaded."""
        self._closed.set()
        self._call("POST", f"/api/v1/sessions/{self.session_id}/finish", {})
        ray.kill(self._gateway)


def _heartbeat(client_ref: weakref.ref, closed: threading.Event) -> None:
    """A ServiceClient's session heartbeat, every HEARTBEAT_S as the SDK does (a session whose
    client goes quiet for the server's `session_expiry_s` is finished and its models unloaded).
    It holds the client weakly, so a client nobody holds goes (and its session then expires),
    and it stops with the session, with Ray, or when the key no longer authenticates."""
    while not closed.wait(HEARTBEAT_S):
        client = client_ref()
        if client is None or not ray.is_initialized():  # NOTE: a call would start Ray again
            return
        try:
            client._call("POST", "/api/v1/session_heartbeat", {"session_id": client.session_id})
        except (UserError, NotFoundError, AuthenticationError):  # finished (410), unknown, or refused
            return
        except Exception:  # the cluster is away for a moment: the next beat tries again
            pass
        del client


class TrainingClient:
    """One LoRA training model. Calls return RayFutures at once and run in the order they were made."""

    def __init__(self, service: ServiceClient, model_id: str, base_model: str, last_seq_id: int):
        self.service = service
        self.model_id = model_id
        self.base_model = base_model
        self._gateway = service._gateway
        self._seq = itertools.count(last_seq_id + 1)
        self._lock = threading.Lock()  # a seq_id is taken and its call sent together: order kept

    def _run(self, path: str, result_type: str, make_body: Any) -> RayFuture:
        with self._lock:
            body = make_body(next(self._seq))
            return as_future(self._gateway.run.remote(path, body, result_type))

    def forward_backward(
        self, data: list[Any], loss_fn: str = "cross_entropy", loss_fn_config: dict[str, float] | None = None
    ) -> RayFuture:
        """Forward and backward over `data` (tinker.types.Datum); gradients accumulate until optim_step."""
        return self._forward(data, loss_fn, loss_fn_config, forward_only=False)

    def forward(
        self, data: list[Any], loss_fn: str = "cross_entropy", loss_fn_config: dict[str, float] | None = None
    ) -> RayFuture:
        """The forward pass only: log-probs and the loss, no gradient."""
        return self._forward(data, loss_fn, loss_fn_config, forward_only=True)

    def _forward(self, data, loss_fn, loss_fn_config, forward_only: bool) -> RayFuture:
        from tinker import types
        from tinker.proto.request_conv import forward_backward_request_to_proto

        def body(seq_id: int) -> bytes:
            batch = types.ForwardBackwardInput(data=list(data), loss_fn=loss_fn, loss_fn_config=loss_fn_config)
            request = types.ForwardBackwardRequest(forward_backward_input=batch, model_id=self.model_id, seq_id=seq_id)
            message = forward_backward_request_to_proto(request)
            message.forward_only = forward_only
            return message.SerializeToString()

        return self._run("/api/v1/forward_backward", "ForwardBackwardOutput", body)

    def optim_step(self, adam_params: Any) -> RayFuture:
        """One optimizer step with `adam_params` (tinker.types.AdamParams) on the accumulated gradients."""
        return self._request("/api/v1/optim_step", "OptimStepRequest", "OptimStepResponse", optim_params=adam_params)

    def save_state(self, name: str, ttl_seconds: int | None = None) -> RayFuture:
        """Weights and optimizer state as a checkpoint; its result's `path` is the tinker:// path."""
        fields = {"path": name, "ttl_seconds": ttl_seconds}
        return self._request("/api/v1/save_weights", "SaveWeightsRequest", "SaveWeightsResponse", **fields)

    def load_state(self, path: str, optimizer: bool = False) -> RayFuture:
        """Load a checkpoint's weights (and, with `optimizer`, its optimizer state) into this model."""
        fields = {"path": path, "optimizer": optimizer}
        return self._request("/api/v1/load_weights", "LoadWeightsRequest", "LoadWeightsResponse", **fields)

    def load_state_with_optimizer(self, path: str) -> RayFuture:
        return self.load_state(path, optimizer=True)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None) -> RayFuture:
        """The adapter's weights for sampling; its result's `path` is the tinker:// sampler path."""
        fields = {"path": name, "ttl_seconds": ttl_seconds}
        request, result = "SaveWeightsForSamplerRequest", "SaveWeightsForSamplerResponse"
        return self._request("/api/v1/save_weights_for_sampler", request, result, **fields)

    def _request(self, route: str, request: str, result: str, **fields: Any) -> RayFuture:
        """The JSON request tinker.types.<request> for this model, numbered in call order."""
        from tinker import types

        def body(seq_id: int) -> dict:
            return _json(getattr(types, request)(model_id=self.model_id, seq_id=seq_id, **fields))

        return self._run(route, result, body)

    def save_weights_and_get_sampling_client(self, name: str) -> SamplingClient:
        """Save the adapter for sampling and a sampler of it (waits for the save)."""
        return self.service.create_sampling_client(model_path=self.save_weights_for_sampler(name).result().path)

    def get_tokenizer(self) -> Any:
        return self.service.get_tokenizer(self.base_model)

    def get_info(self) -> Any:
        from tinker import types

        return types.GetInfoResponse.model_validate(
            self.service._call("POST", "/api/v1/get_info", {"model_id": self.model_id})
        )


class SamplingClient:
    """A sampler of an adapter or a base model; `sample` returns a RayFuture of a SampleResponse."""

    def __init__(self, gateway: Any, sampling_session_id: str):
        self._gateway = gateway
        self.sampling_session_id = sampling_session_id
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def sample(
        self, prompt: Any, num_samples: int, sampling_params: Any, include_prompt_logprobs: bool = False
    ) -> RayFuture:
        """`num_samples` completions of `prompt` (tinker.types.ModelInput) under `sampling_params`."""
        from tinker import types

        with self._lock:
            request = types.SampleRequest(
                sampling_session_id=self.sampling_session_id,
                seq_id=next(self._seq),
                num_samples=num_samples,
                prompt=prompt,
                sampling_params=sampling_params,
                prompt_logprobs=include_prompt_logprobs,
            )
            return as_future(self._gateway.run.remote("/api/v1/asample", _json(request), "SampleResponse"))


def _json(request: Any) -> dict:
    """An SDK request model as the JSON the routes take (as the SDK sends it)."""
    return request.model_dump(mode="json", exclude_none=True)
