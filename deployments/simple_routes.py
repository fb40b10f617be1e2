"""The original Thinker server's simple JSON routes, kept on the same app and port.

- Training data are chat conversations (`[[{"role", "content"}, ...], ...]`), rendered by the
  model actor with the base model's chat template. `POST /fwdbwd` (and `/api/v1/forward_backward`
  with a JSON body) creates the adapter on first use, as the original server did (rank 16);
  `/add_lora` chooses the base model and rank explicitly.
- Results: `POST /retrieve_future` answers `{"loss", "metrics": {"mean_nll", "perplexity", ...}}`
  for forward_backward, `{"metrics"}` for optim_step, `{"status": "pending", "request_id"}` with
  HTTP 202 while pending, and `{"error", "category"}` with a 4xx/5xx status on failure.
- Adapters made here are ordinary training models: the SDK can use them by model_id, and the
  other way round.
"""

from functools import partial
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from actors import ids
from actors.metadata.futures import LoggedCall
from actors.work import ChatForwardBackwardWork, CreateModelWork, GenerateWork, LoraSpec, OptimStepWork
from configs.errors import UserError
from configs.schema import ThinkerConfig
from deployments import wire
from deployments.futures import Futures, deployment_call
from deployments.limits import Limits
from deployments.model_handles import ModelHandles
from deployments.tenancy import Tenancy, Tenant


class SimpleRoutes:
    def __init__(self, models: ModelHandles, futures: Futures, tenancy: Tenancy, config: ThinkerConfig):
        self._models = models
        self._futures = futures
        self._tenancy = tenancy
        self._config = config
        self._limits = Limits(config.limits)

    def routes(self) -> list[tuple[str, str, Any]]:
        return [
            ("POST", "/fwdbwd", self.forward_backward),
            ("POST", "/optim_step", self.optim_step),
            ("POST", "/retrieve_future", self.retrieve_future),
            ("GET", "/loss_functions", self.loss_functions),
            ("GET", "/adapters", self.list_adapters),
            ("DELETE", "/adapters/{model_id:path}", self.delete_adapter),
            ("POST", "/add_lora", self.add_lora),
            ("POST", "/remove_lora", self.remove_lora),
            ("POST", "/generate", self.generate),
            ("POST", "/api/v1/sample", self.generate),
        ]

    @property
    def _default_base(self) -> str:
        return self._models.names[0]

    async def forward_backward(self, body: wire.ChatForwardBackwardRequest, tenant: Tenant) -> dict:
        if body.loss_fn == "stable_reinforce":  # its sampler log-probs come from provenance spans, which chat data lack
            raise UserError("stable_reinforce needs provenance spans: use the Tinker forward_backward (protobuf)")
        self._limits.check_count("conversations", len(body.data), self._config.limits.max_datums, "limits.max_datums")
        self._limits.check_messages(sum(len(conversation) for conversation in body.data))
        inputs = body.inputs_per_conversation()
        try:
            base = await self._models.base_of_model(tenant, body.model_id)
            create_with = None
        except LookupError:  # created on first use, on the default base model
            ids.check_name(body.model_id, "a new adapter's model_id")
            create_with = LoraSpec(rank=wire.SIMPLE_RANK)
            await self._tenancy.record_run(tenant, body.model_id, None, self._default_base, create_with, {})
            base = self._default_base
        work = ChatForwardBackwardWork(
            model_id=body.model_id,
            conversations=body.data,
            loss_fn=body.loss_fn,
            loss_fn_inputs=inputs,
            loss_fn_config=dict(body.loss_fn_config or {}),
            create_with=create_with,
            tenant=tenant,
        )
        call = partial(deployment_call, self._models.base(base), "chat_forward_backward", work)
        request_id = await self._futures.submit("forward_backward", tenant, base, call, self._logged(work))
        return {"request_id": request_id, "model_id": body.model_id}

    async def forward_backward_json(self, raw: bytes, tenant: str) -> dict:
        """/api/v1/forward_backward with a JSON body (the ingress sends the SDK's protobuf elsewhere)."""
        try:
            body = wire.ChatForwardBackwardRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise UserError(f"invalid forward_backward JSON: {exc.errors()[0]['msg']}") from None
        return await self.forward_backward(body, tenant)

    async def optim_step(self, body: wire.OptimStepRequest, tenant: Tenant) -> dict:
        base = await self._models.base_of_model(tenant, body.model_id)
        work = OptimStepWork(body.model_id, body.seq_id, body.adam_params.to_work(), tenant)
        call = partial(deployment_call, self._models.base(base), "optim_step", work)
        request_id = await self._futures.submit("optim_step", tenant, base, call, self._logged(work))
        return {"request_id": request_id, "model_id": body.model_id}

    def _logged(self, work: ChatForwardBackwardWork | OptimStepWork) -> LoggedCall | None:
        """The request in its adapter's request log (run again if the deployment restarts)."""
        if not self._config.durable_training:
            return None
        verb = "optim_step" if isinstance(work, OptimStepWork) else "chat_forward_backward"
        return LoggedCall(work.model_id, work.seq_id if isinstance(work, OptimStepWork) else None, verb, (work,))

    async def retrieve_future(self, body: wire.RetrieveFutureRequest, tenant: Tenant) -> JSONResponse:
        done, value, failure, entry = await self._futures.poll(body.request_id, tenant, self._config.long_poll_s)
        if not done:
            return JSONResponse({"status": "pending", "request_id": body.request_id}, status_code=202)
        if failure is not None:
            status, error = failure
            return JSONResponse(error, status_code=status)
        return JSONResponse(simple_result(entry.kind, value))

    async def loss_functions(self) -> dict:
        descriptions = await self._models.base(self._default_base).loss_functions.remote()
        return {"available_loss_functions": list(descriptions), "descriptions": descriptions}

    async def list_adapters(self, tenant: Tenant) -> dict:
        """The caller's live training models (made here or by the SDK)."""
        registry = self._tenancy.registry
        adapters = []
        for run_id in await self._tenancy.run(registry.live_runs, tenant):
            run = await self._tenancy.run(registry.run, tenant, run_id)
            lora = LoraSpec(**run.lora)
            adapters.append(
                {
                    "model_id": run.id,
                    "base_model": run.base_model,
                    "rank": lora.rank,
                    "train_attn": lora.train_attn,
                    "train_mlp": lora.train_mlp,
                    "train_unembed": lora.train_unembed,
                }
            )
        return {"adapters": adapters}

    async def add_lora(self, body: wire.AddLoraRequest, tenant: Tenant) -> dict:
        ids.check_name(body.model_id, "a new adapter's model_id")
        base = body.base_model or self._default_base
        handle = self._models.base(base)
        if await self._tenancy.run(self._tenancy.registry.run_exists, tenant, body.model_id):
            raise UserError(f"adapter {body.model_id!r} already exists")
        lora = LoraSpec(rank=body.rank, seed=body.seed)
        await self._tenancy.record_run(tenant, body.model_id, None, base, lora, {})
        try:
            info = await handle.create_model.remote(CreateModelWork(body.model_id, lora, tenant=tenant))
        except Exception:
            await self._tenancy.run(self._tenancy.registry.forget_run, body.model_id)  # no adapter: no record
            raise
        return {"model_id": info.model_id, "base_model": info.base_model, "rank": info.lora.rank}

    async def remove_lora(self, body: wire.ModelIdRequest, tenant: Tenant) -> dict:
        return await self.delete_adapter(body.model_id, tenant)

    async def delete_adapter(self, model_id: str, tenant: Tenant) -> dict:
        handle = await self._models.of_model(tenant, model_id)
        await handle.unload_model.remote(model_id)
        await self._tenancy.run(self._tenancy.registry.unload_run, model_id)
        return {"deleted": model_id}

    async def generate(self, body: wire.GenerateRequest, tenant: Tenant) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise UserError("give exactly one of prompt (text) or messages (chat)")
        self._limits.check_messages(len(body.messages or []))
        limits = self._config.limits
        self._limits.check_count("num_samples", body.num_samples, limits.max_num_samples, "limits.max_num_samples")
        self._limits.check_count(
            "max_tokens", body.max_tokens or 0, limits.max_sample_tokens, "limits.max_sample_tokens"
        )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self._limits.check_count("stop sequences", len(stops), limits.max_stop_sequences, "limits.max_stop_sequences")
        sampler_id = body.model_id or self._default_base
        handle = await self._sampling_handle(tenant, sampler_id)
        params = wire.SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop,
        ).to_work()
        work = GenerateWork(sampler_id, body.prompt, body.messages, body.num_samples, params, tenant=tenant)
        out = await handle.generate_text.remote(work)
        return {
            "model_id": sampler_id,
            "text": out.texts[0],
            "texts": out.texts,
            "tokens": out.tokens,
            "logprobs": out.logprobs,
            "stop_reasons": out.stop_reasons,
            "prompt_tokens": out.prompt_tokens,
        }

    async def _sampling_handle(self, tenant: str, sampler_id: str) -> Any:
        try:
            return await self._models.of_sampler(tenant, sampler_id)
        except LookupError:
            return await self._models.of_model(tenant, sampler_id)


def simple_result(kind: str, value: Any) -> dict:
    """The simple routes' result shapes: metric names without their ':reduction' suffix."""
    metrics = wire.finite_metrics(value.metrics) if kind in ("forward_backward", "optim_step") else {}
    if kind == "forward_backward":
        loss = metrics.pop("loss:sum", None)
        return {"loss": loss, "metrics": {key.split(":")[0]: v for key, v in metrics.items()}}
    if kind == "optim_step":
        return {"metrics": {key.split(":")[0]: v for key, v in metrics.items()}}
    if kind == "create_model":
        return {"model_id": value.model_id}
    if isinstance(value, str):
        return {"result": value}
    raise UserError(f"a {kind} result has no simple-route form; retrieve it with /api/v1/retrieve_future")
