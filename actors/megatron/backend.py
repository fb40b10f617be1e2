"""The Megatron backend: the same Backend interface as the HF backend, over a group of rank actors.

- Requests are validated here (same checks as the HF backend), then every rank runs its part;
  results come from the reporting ranks (last pipeline stage, TP rank 0, each DP replica).
- A pass holds every adapter the scheduler batched (as in the HF backend); data-parallel replicas
  each take a contiguous slice of every request's datums.
- Adapters travel as PEFT files (`actors.peft_format`): a checkpoint written here loads in the
  HF backend and the other way round.
- A lost rank (dead or not answering) does not fail the request: the group is rebuilt, every
  training model and sampler comes back exactly, and the request runs again (the client sees a
  delay). For that the backend keeps, per training model, a restore point (the files of its last
  snapshot, save or load; none: its seeded initial weights) and a journal of what changed it
  since (forward_backward, optim_step, and the sampler snapshots taken from it), replayed in
  order on the new group. A restore point is taken every `JOURNAL_STEPS` optim_steps (and at
  each durable snapshot), so a replay stays short. A sampler made from files keeps its files; a
  snapshot sampler is replayed from its model's journal, or exported to files before the
  journal that made it is dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from actors.batch import validate_data
from actors.generation import generate_uncached
from actors.megatron.group import RankGroup, RankLost
from actors.megatron.rank import merge_reports
from actors.model_source import resolve_source, tokenizer_source
from actors.peft_format import OPTIMIZER_FILE, adapter_files, optimizer_file, read_adapter, read_optimizer
from actors.sample_rows import SampleLimits, to_rows
from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    LoraSpec,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
    SampleResult,
    SamplerInfo,
    SampleWork,
)
from configs.errors import NotFoundError, ThinkerError, UserError
from configs.schema import BaseModelConfig
from losses import loss_spec

logger = logging.getLogger(__name__)
JOURNAL_STEPS = 8  # optim_steps a training model's journal holds before a new restore point is taken


class _Weights:
    """The (A, B) pair in PEFT's file helpers' shape."""

    def __init__(self, A, B):
        self.A, self.B = A, B


class MegatronBackend:
    """The Backend interface over a group of megatron-core rank actors (TP x PP x DP): validates
    here, sends each verb to every rank, merges the reporting ranks' results. Keeps what it needs
    to rebuild every adapter exactly on a new group after a rank is lost, and runs the request
    that met the loss again."""

    def __init__(self, config: BaseModelConfig, cache_dir: str = "~/.cache/thinker"):
        self.config = config
        self._cache_dir = cache_dir
        hf_config = _hf_config(config, cache_dir)
        check_layout(hf_config, config)
        self._group = RankGroup(config, cache_dir)
        self.vocab_size = int(hf_config.vocab_size)
        self.max_seq_len = int(config.max_seq_len or hf_config.max_position_embeddings)
        self.tokenizer_dir = tokenizer_source(config, cache_dir, self.vocab_size)
        self.tokenizer = _tokenizer(self.tokenizer_dir)
        self.eos_ids = frozenset([self.tokenizer.eos_token_id]) if self.tokenizer is not None else frozenset()
        self._models: dict[str, ModelInfo] = {}
        # model id -> files of its restore point (None: its seeded initial weights), and what changed it since
        self._restore: dict[str, dict[str, bytes] | None] = {}
        self._journal: dict[str, list[tuple[str, object]]] = {}
        self._samplers: dict[str, SamplerInfo] = {}
        self._sampler_files: dict[str, dict[str, bytes]] = {}  # a sampler's weights, when not in a journal

    @staticmethod
    def cancelled(request_id: str) -> bool:
        """Whether a sampling request's client cancelled it (the model actor replaces this)."""
        return False

    def init_compute_thread(self) -> None:
        pass  # the compute runs in the rank actors

    def describe(self) -> ModelDescription:
        return ModelDescription.of(self.config, self.vocab_size, self.max_seq_len, self.tokenizer_dir)

    # ---- training models ------------------------------------------------------------------------

    def create_model(self, work: CreateModelWork) -> ModelInfo:
        lora = work.lora.seeded()
        lora.validate(self.config.max_lora_rank)
        self._recovering(self._group.call, "create_adapter", work.model_id, lora, self.config.lora_alpha)
        info = ModelInfo(work.model_id, self.config.name, lora, "llama", self.tokenizer_dir, dict(work.user_metadata))
        self._models[work.model_id] = info
        self._restore[work.model_id], self._journal[work.model_id] = None, []
        return info

    def get_info(self, model_id: str) -> ModelInfo:
        if model_id not in self._models:
            raise NotFoundError(f"no training model {model_id!r} on this base model")
        return self._models[model_id]

    def list_models(self) -> list[str]:
        return list(self._models)

    def adapter_counts(self) -> tuple[int, int]:
        return len(self._models), 0  # every adapter lives on its ranks: none is offloaded

    def unload_model(self, model_id: str) -> None:
        self.get_info(model_id)
        self._recovering(self._settle_samplers, model_id)
        self._recovering(self._group.call, "remove_adapter", model_id)
        del self._models[model_id]
        self._restore.pop(model_id, None)
        self._journal.pop(model_id, None)

    def check_forward_backward(self, work: ForwardBackwardWork) -> None:
        self.get_info(work.model_id)
        spec = loss_spec(work.loss_fn, work.custom_loss)
        spec.resolve_config(work.loss_fn_config)
        validate_data(work.data, spec, self.vocab_size, self.max_seq_len, self.config.max_batch_tokens)

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult:
        (outcome,) = self.forward_backward_batch([work])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def forward_backward_batch(self, works: list[ForwardBackwardWork]) -> list[ForwardBackwardResult | Exception]:
        """Every valid request in one pipeline pass, each with its adapter and loss; data-parallel
        replicas each take a contiguous slice of every request's datums."""
        outcomes: list[ForwardBackwardResult | Exception | None] = [None] * len(works)
        ready = []
        for i, work in enumerate(works):
            try:
                self.check_forward_backward(work)
                ready.append(i)
            except ThinkerError as exc:
                outcomes[i] = exc
        if not ready:
            return outcomes
        batch = [works[i] for i in ready]
        for i, merged in zip(ready, self._recovering(self._forward_backward, batch)):
            outcomes[i] = merged
            if not isinstance(merged, Exception) and not works[i].forward_only:
                self._journal[works[i].model_id].append(("forward_backward", works[i]))
        return outcomes

    def _forward_backward(self, batch: list[ForwardBackwardWork]) -> list[ForwardBackwardResult | Exception]:
        """One pass over the group: per request its merged result (or its loss's error)."""
        dp = self.config.megatron.data_parallel
        bounds = [np.linspace(0, len(w.data), dp + 1).astype(int) for w in batch]
        per_rank = [([(int(b[c["dp"]]), int(b[c["dp"] + 1])) for b in bounds],) for c in self._group.coords]
        reports = [r for r in self._group.reports(self._group.call("forward_backward", batch, per_rank=per_rank)) if r]
        return [merge_reports([r[j] for r in reports if r[j] is not None]) for j in range(len(batch))]

    def optim_step(self, work: OptimStepWork) -> OptimStepResult:
        self.get_info(work.model_id)
        metrics = self._recovering(self._optim_step, work)
        journal = self._journal[work.model_id]
        journal.append(("optim_step", work))
        if sum(verb == "optim_step" for verb, _ in journal) >= JOURNAL_STEPS:
            try:  # a new restore point; the step is done whether or not it can be taken now
                self.save_state(work.model_id, with_optimizer=True)
            except Exception:
                logger.exception("no new restore point for %s (its journal keeps growing)", work.model_id)
        return OptimStepResult(metrics=metrics)

    def _optim_step(self, work: OptimStepWork) -> dict:
        (metrics, *_) = self._group.reports(self._group.call("optim_step", work.model_id, work.adam))
        return metrics

    # ---- weights in and out ---------------------------------------------------------------------

    def save_state(self, model_id: str, with_optimizer: bool) -> dict[str, bytes]:
        info = self.get_info(model_id)
        files = self._recovering(self._export, model_id, info.lora.rank, with_optimizer)
        if with_optimizer:  # the model's whole state but its accumulated gradients: its new restore point
            self._recovering(self._settle_samplers, model_id)
            journal = self._journal[model_id]
            steps = [i for i, (verb, _) in enumerate(journal) if verb == "optim_step"]
            since_step = journal[steps[-1] + 1 :] if steps else journal
            self._restore[model_id] = files
            self._journal[model_id] = [entry for entry in since_step if entry[0] == "forward_backward"]
        return files

    def _export(self, key: str, rank: int, with_optimizer: bool) -> dict[str, bytes]:
        """An adapter's PEFT files (with its AdamW state when asked), gathered from the ranks."""
        weights, moments, step = {}, {}, 0
        for part in self._group.call("export_adapter", key, with_optimizer):
            if part is not None:
                weights.update(part["weights"])
                moments.update(part["moments"])
                step = max(step, part["step"])
        as_lora = {name: _Weights(A, B) for name, (A, B) in weights.items()}
        files = adapter_files(as_lora, rank, self.config.lora_alpha, self.config.name)
        if with_optimizer:
            files[OPTIMIZER_FILE] = optimizer_file(moments, step)
        return files

    def snapshot_state(self, model_id: str) -> Callable[[], dict[str, bytes]]:
        """The ranks hold the state: gathering it is a collective, so it runs now."""
        files = self.save_state(model_id, with_optimizer=True)
        return lambda: files

    def load_state(self, model_id: str, files: dict[str, bytes], with_optimizer: bool) -> None:
        info = self.get_info(model_id)
        full, config = read_adapter(files)
        if config.get("r") != info.lora.rank:
            raise UserError(
                f"checkpoint rank {config.get('r')} does not fit training model {model_id!r} (rank {info.lora.rank})"
            )
        if with_optimizer and OPTIMIZER_FILE not in files:
            raise UserError("this checkpoint holds no optimizer state (save it with save_state)")
        if not with_optimizer:
            files = {name: data for name, data in files.items() if name != OPTIMIZER_FILE}
        self._recovering(self._settle_samplers, model_id)
        self._recovering(self._replace, info, full, files)
        self._restore[model_id], self._journal[model_id] = files, []

    def _replace(self, info: ModelInfo, full: dict, files: dict[str, bytes]) -> None:
        self._group.call("remove_adapter", info.model_id)
        self._import(info, full, files)

    def _import(self, info: ModelInfo, full: dict, files: dict[str, bytes]) -> None:
        """A training model's weights (and AdamW state, when `files` holds it) into every rank."""
        moments, step = read_optimizer(files[OPTIMIZER_FILE]) if OPTIMIZER_FILE in files else ({}, 0)
        self._group.call("import_adapter", info.model_id, full, info.lora, self.config.lora_alpha, True, moments, step)

    # ---- sampling ---------------------------------------------------------------------------------

    def create_sampler(self, info: SamplerInfo, files: dict[str, bytes] | None) -> SamplerInfo:
        if files is not None:
            self._recovering(self._import_sampler, info.sampler_id, files)
            self._sampler_files[info.sampler_id] = files
        self._samplers[info.sampler_id] = info
        return info

    def _import_sampler(self, sampler_id: str, files: dict[str, bytes]) -> None:
        full, config = read_adapter(files)
        lora = LoraSpec(rank=int(config["r"]))
        self._group.call("import_adapter", sampler_id, full, lora, float(config["lora_alpha"]), False)

    def snapshot_sampler(self, model_id: str, info: SamplerInfo) -> SamplerInfo:
        self.get_info(model_id)
        self._recovering(self._group.call, "copy_adapter", model_id, info.sampler_id)
        self._samplers[info.sampler_id] = info
        self._sampler_files.pop(info.sampler_id, None)
        self._journal[model_id].append(("copy_adapter", info.sampler_id))
        return info

    def sampler_state(self, sampler_id: str) -> Callable[[], dict[str, bytes]]:
        """The ranks hold the weights: gathering them is a collective, so it runs now."""
        info = self.sampler_info(sampler_id)
        files = self._sampler_files.get(sampler_id)
        if files is None:
            if info.source_model_id not in self._models:
                raise UserError(f"sampling session {sampler_id!r} has no weights of its own")
            rank = self._models[info.source_model_id].lora.rank
            files = self._recovering(self._export, sampler_id, rank, False)
        return lambda: files

    def sampler_info(self, sampler_id: str) -> SamplerInfo:
        if sampler_id not in self._samplers:
            raise NotFoundError(f"no sampling session {sampler_id!r} on this base model")
        return self._samplers[sampler_id]

    def list_samplers(self) -> list[str]:
        return list(self._samplers)

    def remove_sampler(self, sampler_id: str) -> None:
        self._samplers.pop(sampler_id, None)
        self._sampler_files.pop(sampler_id, None)
        self._recovering(self._group.call, "remove_adapter", sampler_id)

    def sample(self, works: list[SampleWork]) -> list[SampleResult | Exception]:
        outcomes: list[SampleResult | Exception] = []
        for work in works:
            try:
                outcomes.append(self._recovering(self._sample, work))
            except ThinkerError as exc:
                outcomes.append(exc)
        return outcomes

    def _sample(self, work: SampleWork) -> SampleResult:
        if work.sampler_id == self.config.name:
            key = ""
        elif work.sampler_id in self._models or work.sampler_id in self._samplers:
            key = work.sampler_id
        else:
            raise NotFoundError(f"no sampling session {work.sampler_id!r} on this base model")
        limits = SampleLimits(
            self.vocab_size,
            self.max_seq_len,
            self.config.default_max_tokens,
            self.config.max_sample_rows,
            self.eos_ids,
            self.tokenizer is not None,
            _cpu(),
            self.cancelled,
        )
        rows = to_rows(work, key, limits)

        def next_logits(tokens, lengths, all_positions):
            (logits, *_) = self._group.reports(self._group.call("next_logits", key, tokens, lengths, all_positions))
            return logits

        outputs = generate_uncached(next_logits, rows, decode=self._decode)
        failed = next((o.error for o in outputs if o.error), None)
        if failed is not None:
            raise failed
        return SampleResult(
            sequences=[o.sequence for o in outputs],
            prompt_logprobs=outputs[0].prompt_logprobs,
            topk_prompt_ids=outputs[0].topk_ids,
            topk_prompt_logprobs=outputs[0].topk_logprobs,
            target_prompt_logprobs=outputs[0].target_logprobs,
        )

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ---- failures ---------------------------------------------------------------------------------

    def _recovering(self, fn: Callable, *args):
        """`fn(*args)` on the group; when a rank is lost meanwhile, once more on a rebuilt group."""
        try:
            self._heal()
            return fn(*args)
        except RankLost as exc:
            logger.warning("%s: %s; rebuilding the group and running the request again", self.config.name, exc)
        self._heal()
        return fn(*args)

    def _heal(self) -> None:
        """Rebuild a broken group and bring every adapter back as it was: samplers from their files,
        training models from their restore points, then their journals replayed in order."""
        if not self._group.broken:
            return
        started = time.monotonic()
        try:
            self._restore_all()
        except BaseException:
            self._group.broken = True  # half restored: rebuilt again before the next request
            raise
        logger.warning(
            "%s: Megatron group rebuilt in %.1f s: %d training models, %d samplers",
            self.config.name,
            time.monotonic() - started,
            len(self._models),
            len(self._samplers),
        )

    def _restore_all(self) -> None:
        self._group.rebuild()
        for sampler_id, files in self._sampler_files.items():
            self._import_sampler(sampler_id, files)
        for model_id, info in self._models.items():
            files = self._restore[model_id]
            if files is None:
                self._group.call("create_adapter", model_id, info.lora, self.config.lora_alpha)
            else:
                self._import(info, read_adapter(files)[0], files)
            for verb, item in self._journal[model_id]:
                if verb == "forward_backward":
                    self._forward_backward([item])
                elif verb == "optim_step":
                    self._optim_step(item)
                elif item in self._samplers and item not in self._sampler_files:  # copy_adapter
                    self._group.call("copy_adapter", model_id, item)

    def _settle_samplers(self, model_id: str) -> None:
        """Before a model's journal is dropped: the snapshot samplers it made, exported to files."""
        rank = self._models[model_id].lora.rank
        for verb, item in self._journal.get(model_id, []):
            if verb == "copy_adapter" and item in self._samplers and item not in self._sampler_files:
                self._sampler_files[item] = self._export(item, rank, with_optimizer=False)

    def close(self) -> None:
        self._group.close()


def check_layout(hf_config, config: BaseModelConfig) -> None:
    """The parallel sizes must split the model evenly; say which do not before any rank starts."""
    tp, pp = config.megatron.tensor_parallel, config.megatron.pipeline_parallel
    sizes = {
        "num_attention_heads": (hf_config.num_attention_heads, tp),
        "num_key_value_heads": (getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads, tp),
        "intermediate_size": (hf_config.intermediate_size, tp),
        "vocab_size": (hf_config.vocab_size, tp),
    }
    layers, last = hf_config.num_hidden_layers, config.megatron.last_stage_layers
    if last is None or pp == 1:
        sizes["num_hidden_layers"] = (layers, pp)
    elif last >= layers:
        raise UserError(f"{config.name}: last_stage_layers {last} leaves no layers for the other stages of {layers}")
    else:
        sizes["layers before the last stage"] = (layers - last, pp - 1)
    wrong = [f"{name} {value} by {by}" for name, (value, by) in sizes.items() if value % by]
    if wrong:
        raise UserError(
            f"{config.name}: tensor_parallel={tp} x pipeline_parallel={pp} does not divide the model evenly: "
            f"cannot split {', '.join(wrong)}"
        )


def _hf_config(config: BaseModelConfig, cache_dir: str):
    from transformers import AutoConfig, LlamaConfig

    if config.random_init is not None:
        return LlamaConfig(**config.random_init)
    return AutoConfig.from_pretrained(resolve_source(config, cache_dir))


def _tokenizer(folder: str | None):
    if folder is None or not Path(folder).exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _cpu():
    import torch

    return torch.device("cpu")
