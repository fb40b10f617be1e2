"""The HF backend: a transformers causal LM with Thinker's multi-adapter LoRA layers.

- One copy of the frozen base weights serves every adapter; each forward_backward routes the
  batch rows to their adapter (see `actors.lora.Routing`) and gradients land on that adapter's
  parameters only. Sampling decodes many requests, each with its own adapter, in one batch.
- A pass runs packed by default (`packed_passes`): its rows back to back in one sequence with
  attention kept to each row (`actors.hf.packed_attention`), so no compute goes to padding.
- Adapters travel in and out as PEFT files (`actors.peft_format`); storage is the caller's job.
- Called from one thread at a time (the model actor's compute thread).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from actors.batch import (
    RequestSpan,
    loss_inputs,
    pack_flat,
    pack_pass,
    request_logprobs,
    request_result,
    validate_data,
)
from actors.decoding import DecodeEngine
from actors.generation import GenRow, generate, sample_result
from actors.hf.adapters import AdapterTable
from actors.hf.base_model import load_base_model
from actors.hf.packed_attention import install_packed_attention, packed_forward_kwargs
from actors.hf.samplers import SamplerTable
from actors.hf.spill import remove_leftovers
from actors.logprobs import head_is_separable, scored_logprobs, target_logprobs
from actors.lora import LoraWeights, Routing, install_lora_layers
from actors.peft_format import (
    OPTIMIZER_FILE,
    adapter_files,
    load_optimizer_state,
    optimizer_file,
    read_adapter,
)
from actors.sample_rows import SampleLimits, to_rows
from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
    SampleResult,
    SamplerInfo,
    SampleWork,
)
from configs.errors import ServerError, ThinkerError, UserError
from configs.schema import BaseModelConfig
from losses import loss_spec

logger = logging.getLogger(__name__)


def pick_device(config: BaseModelConfig) -> torch.device:
    if config.num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class HFBackend:
    """A transformers model in this process with multi-adapter LoRA layers: many adapters train
    and sample in one batched pass over one copy of the frozen base weights. Adapters beyond
    max_resident_adapters are offloaded (bit-exact) instead of failing anyone's request."""

    def __init__(self, config: BaseModelConfig, cache_dir: str = "~/.cache/thinker"):
        self.config = config
        self.device = pick_device(config)
        self.init_compute_thread()
        loaded = load_base_model(config, cache_dir)
        self.arch = loaded.arch
        self.tokenizer_dir = loaded.tokenizer_dir
        self.tokenizer = _load_tokenizer(loaded.tokenizer_dir)
        self.model = loaded.model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.separable_head = head_is_separable(self.model)  # else logits only through the model's own forward
        self.packed = config.packed_passes and self.separable_head and install_packed_attention(self.model)
        if config.packed_passes and not self.packed:
            logger.warning("%s: this model's attention cannot run packed passes; they run padded", config.name)
        self.routing = Routing()
        self.lora_layers = install_lora_layers(self.model, self.routing)
        if not self.lora_layers:
            raise ValueError(f"no LoRA-able projections found in a {self.arch!r} model")
        spill_root = str(Path(cache_dir).expanduser() / "spill")
        remove_leftovers(spill_root)
        self.adapters = AdapterTable(
            self.lora_layers,
            config.max_lora_rank,
            config.lora_alpha,
            resident_capacity=config.max_resident_adapters,
            spill_root=spill_root,
        )
        self.samplers = SamplerTable(self.lora_layers, config.max_resident_samplers, spill_root)
        hf_config = self.model.config
        self.vocab_size = int(hf_config.vocab_size)
        self.max_seq_len = int(config.max_seq_len or getattr(hf_config, "max_position_embeddings", 2048))
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.decoder = None  # continuous batching (the scheduler steps it); None: `sample` batches
        if config.continuous_batching:
            self.decoder = self.decode_engine()

    def decode_engine(self, **options) -> DecodeEngine:
        """A continuous-batching engine over this backend's model and adapters; `options` (e.g.
        max_rows, prefill_chunk_tokens, fold_prefill) replace what the config says."""
        config = self.config
        settings = {
            "max_rows": config.max_sample_rows,
            "max_adapters": min(config.max_resident_adapters, config.max_resident_samplers),
            "prefill_chunk_tokens": config.prefill_chunk_tokens,
            **options,
        }
        return DecodeEngine(
            self.model,
            self.routing,
            rows_of=self._rows_of,
            keep_resident=self._keep_resident,
            decode=self._decode,
            **settings,
        )

    @staticmethod
    def cancelled(request_id: str) -> bool:
        """Whether a sampling request's client cancelled it (the model actor replaces this)."""
        return False

    def init_compute_thread(self) -> None:
        """torch's intra-op thread count is per thread under OpenMP: Ray sets OMP_NUM_THREADS to the
        actor's CPUs (often 1), and a new thread would run every parallel kernel on one core."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.torch_threads or os.cpu_count() or 1)

    def close(self) -> None:
        """Remove the spill files of offloaded adapters and samplers."""
        self.adapters.close()
        self.samplers.close()

    def describe(self) -> ModelDescription:
        return ModelDescription.of(self.config, self.vocab_size, self.max_seq_len, self.tokenizer_dir)

    # ---- training models ---------------------------------------------------------------------

    def create_model(self, work: CreateModelWork) -> ModelInfo:
        lora = work.lora.seeded()
        info = ModelInfo(
            model_id=work.model_id,
            base_model=self.config.name,
            lora=lora,
            arch=self.arch,
            tokenizer_id=self.tokenizer_dir,
            user_metadata=dict(work.user_metadata),
        )
        self.adapters.create(info)
        return info

    def get_info(self, model_id: str) -> ModelInfo:
        return self.adapters.info(model_id)

    def list_models(self) -> list[str]:
        return self.adapters.ids()

    def adapter_counts(self) -> tuple[int, int]:
        resident = self.adapters.resident_count
        return resident, max(len(self.adapters) - resident, 0)  # two reads: clamp a torn pair

    def unload_model(self, model_id: str) -> None:
        self.adapters.remove(model_id)

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        (outcome,) = self.forward_backward_batch([work])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def forward_backward_batch(self, works: list[ForwardBackwardWork]) -> list[ForwardBackwardResult | Exception]:
        """Every request in one base-model pass, each with its adapter, loss and inputs; one backward.

        A request that fails validation (or whose loss raises) fails alone, before any gradient.
        """
        outcomes: list[ForwardBackwardResult | Exception | None] = [None] * len(works)
        ready = []
        for i, work in enumerate(works):
            try:
                spec, config = self._checked(work)
            except ThinkerError as exc:
                outcomes[i] = exc
                continue
            ready.append((i, work, spec, config))
        if ready:
            self._run_pass(ready, outcomes)
        return outcomes

    def check_forward_backward(self, work: ForwardBackwardWork) -> None:
        """Raise the UserError forward_backward would raise for this request, computing nothing."""
        self._checked(work)

    def _checked(self, work: ForwardBackwardWork):
        self.adapters.info(work.model_id)
        spec = loss_spec(work.loss_fn, work.custom_loss)
        config = spec.resolve_config(work.loss_fn_config)
        validate_data(work.data, spec, self.vocab_size, self.max_seq_len, self.config.max_batch_tokens)
        return spec, config

    def _run_pass(self, ready: list, outcomes: list) -> None:
        self.adapters.make_resident([work.model_id for _, work, _, _ in ready])
        requests = [(work.model_id, work.data) for _, work, _, _ in ready]
        training = frozenset(work.model_id for _, work, _, _ in ready if not work.forward_only)
        with torch.set_grad_enabled(bool(training)):
            flat, spans = self._pass_logprobs(requests, training)
            total, trained = None, set()
            for (i, work, spec, config), span in zip(ready, spans):
                logprobs = request_logprobs(span, flat)
                try:
                    out = spec(logprobs, loss_inputs(work.data, spec, self.device), config)
                    result = request_result(span, logprobs, out)
                except ThinkerError as exc:
                    outcomes[i] = exc
                    continue
                except Exception as exc:  # a custom loss that breaks fails its own request only
                    outcomes[i] = ServerError(f"loss {work.loss_fn!r} failed: {type(exc).__name__}: {exc}")
                    continue
                if not work.forward_only:
                    trained.add(work.model_id)
                    if out.loss.requires_grad:  # a custom loss may not depend on the log-probs: gradient 0
                        total = out.loss if total is None else total + out.loss
                outcomes[i] = result
            if total is not None:
                total.backward()
            for model_id in trained:
                self.adapters.get(model_id).has_grad = True

    def _pass_logprobs(self, requests: list, training: frozenset[str]) -> tuple[torch.Tensor, list[RequestSpan]]:
        """The target log-probs of every scored position of the pass, row by row ([S, K]), and each
        request's span of them: packed, or padded to the longest row."""
        if self.packed:
            flat = pack_flat(requests, self.device)
            self.routing.set(flat.row_keys, frozenset(flat.row_keys) - training, row_tokens=flat.row_lengths)
            forward = packed_forward_kwargs(flat.row_lengths, self.device)
            args = (self.model, flat.tokens_1N, flat.targets_SK, flat.scored_S, self.routing.narrow)
            return scored_logprobs(*args, position_ids=flat.positions_1N, **forward), flat.spans
        batch = pack_pass(requests, self.device)
        self.routing.set(batch.row_keys, frozen=frozenset(batch.row_keys) - training)
        logprobs = target_logprobs(self.model, batch.tokens_BT, batch.targets_BTK, separable=self.separable_head)
        return logprobs[batch.mask_BT], batch.spans

    def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        return OptimStepResult(metrics=self.adapters.get(work.model_id).optim_step(work.adam))

    # ---- weights in and out ------------------------------------------------------------------

    def save_state(self, model_id: str, with_optimizer: bool) -> dict[str, bytes]:
        """The adapter as PEFT files, plus its AdamW state when asked."""
        adapter = self.adapters.get(model_id)
        files = adapter_files(adapter.weights, adapter.info.lora.rank, self.config.lora_alpha, self.config.name)
        if with_optimizer:
            files[OPTIMIZER_FILE] = optimizer_file(adapter.moments(), adapter.step)
        return files

    def snapshot_state(self, model_id: str) -> Callable[[], dict[str, bytes]]:
        """Copies of the weights and moments now (on the compute thread); the files later."""
        adapter = self.adapters.get(model_id)
        weights = {
            name: LoraWeights(A=w.A.detach().cpu().clone(), B=w.B.detach().cpu().clone(), scaling=w.scaling)
            for name, w in adapter.weights.items()
        }
        moments = {key: (m.cpu().clone(), v.cpu().clone()) for key, (m, v) in adapter.moments().items()}
        rank, step = adapter.info.lora.rank, adapter.step

        def files() -> dict[str, bytes]:
            saved = adapter_files(weights, rank, self.config.lora_alpha, self.config.name)
            saved[OPTIMIZER_FILE] = optimizer_file(moments, step)
            return saved

        return files

    def load_state(self, model_id: str, files: dict[str, bytes], with_optimizer: bool) -> None:
        adapter = self.adapters.get(model_id)
        loaded, config = read_adapter(files)
        if set(loaded) != set(adapter.weights) or config.get("r") != adapter.info.lora.rank:
            raise UserError(
                f"checkpoint (rank {config.get('r')}, {len(loaded)} modules) does not fit training model "
                f"{model_id!r} (rank {adapter.info.lora.rank}, {len(adapter.weights)} modules)"
            )
        with torch.no_grad():
            for name, (A, B) in loaded.items():
                adapter.weights[name].A.copy_(A)
                adapter.weights[name].B.copy_(B)
            adapter.buffers["grad"].zero_()
        adapter.has_grad = False
        if with_optimizer:
            if OPTIMIZER_FILE not in files:
                raise UserError("this checkpoint holds no optimizer state (save it with save_state)")
            adapter.step = load_optimizer_state(files[OPTIMIZER_FILE], adapter.moments())
        else:
            adapter.buffers["exp_avg"].zero_()
            adapter.buffers["exp_avg_sq"].zero_()
            adapter.step = 0

    # ---- sampling ----------------------------------------------------------------------------

    def create_sampler(self, info: SamplerInfo, files: dict[str, bytes] | None) -> SamplerInfo:
        """A sampler on the base model (no files) or on a PEFT adapter's files."""
        if files is None:
            self.samplers.add_base(info)
            return info
        loaded, config = read_adapter(files)
        unknown = set(loaded) - set(self.lora_layers)
        if unknown:
            raise UserError(f"adapter targets modules this base model lacks: {sorted(unknown)[:3]}")
        self.samplers.add_adapter(info, loaded, float(config["lora_alpha"]) / int(config["r"]))
        return info

    def snapshot_sampler(self, model_id: str, info: SamplerInfo) -> SamplerInfo:
        """A frozen copy of a training model's current weights, sampled under `info.sampler_id`."""
        adapter = self.adapters.get(model_id)
        weights = {n: (w.A.detach().clone(), w.B.detach().clone()) for n, w in adapter.weights.items()}
        scaling = next(iter(adapter.weights.values())).scaling
        self.samplers.add_adapter(info, weights, scaling)
        return info

    def sampler_state(self, sampler_id: str) -> Callable[[], dict[str, bytes]]:
        """A snapshot sampler's weights copied now; its PEFT files made later, on another thread."""
        copied = self.samplers.weights(sampler_id)
        if copied is None:
            raise UserError(f"sampling session {sampler_id!r} samples the base model: it has no weights of its own")
        weights, scaling = copied
        rank = next(iter(weights.values())).A.shape[0]
        return lambda: adapter_files(weights, rank, scaling * rank, self.config.name)

    def sampler_info(self, sampler_id: str) -> SamplerInfo:
        return self.samplers.info(sampler_id)

    def list_samplers(self) -> list[str]:
        return self.samplers.ids()

    def remove_sampler(self, sampler_id: str) -> None:
        self.samplers.remove(sampler_id)

    def sample(self, works: list[SampleWork]) -> list[SampleResult | ThinkerError]:
        """Every request in one static batch (all rows start and end together); a bad request
        fails alone. The scheduler uses `decoder` instead when continuous batching is on."""
        outcomes: list[SampleResult | ThinkerError | None] = [None] * len(works)
        rows: list[GenRow] = []
        owners: list[int] = []
        for i, work in enumerate(works):
            try:
                new_rows = self._rows_of(work)
            except ThinkerError as exc:
                outcomes[i] = exc
                continue
            rows += new_rows
            owners += [i] * len(new_rows)
        if rows:
            outputs = generate(self.model, self.routing, rows, decode=self._decode)
            for i in sorted(set(owners)):
                outcomes[i] = sample_result([o for o, owner in zip(outputs, owners) if owner == i])
        return outcomes

    def _rows_of(self, work: SampleWork) -> list[GenRow]:
        return to_rows(work, self._routing_key(work.sampler_id), self._sample_limits())

    def _keep_resident(self, sampler_ids: set[str]) -> None:
        """The adapters of these samplers on the layers (a training pass may have offloaded one)."""
        live = [s for s in sampler_ids if s in self.adapters]
        if live:
            self.adapters.make_resident(live)
        self.samplers.make_resident([s for s in sampler_ids if s not in self.adapters])

    def _sample_limits(self) -> SampleLimits:
        return SampleLimits(
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            default_max_tokens=self.config.default_max_tokens,
            max_rows=self.config.max_sample_rows,
            eos_ids=self.eos_ids,
            can_decode=self.tokenizer is not None,
            device=self.device,
            cancelled=self.cancelled,
        )

    def _routing_key(self, sampler_id: str) -> str:
        if sampler_id in self.adapters:  # a training model, sampled live
            self.adapters.get(sampler_id)
            return sampler_id
        if sampler_id == self.config.name:
            return ""
        return self.samplers.routing_key(sampler_id)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)


def _load_tokenizer(tokenizer_dir: str | None):
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return frozenset(ids)
