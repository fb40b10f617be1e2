"""One rank of a Megatron group: a Ray actor holding its GPTModel shard and its adapters' shards.

- `setup` initialises torch.distributed (gloo on CPU, NCCL on GPUs; collectives time out) and
  megatron's parallel state, builds the shard and wraps its linears with LoRA.
- Every verb is called on all ranks of the group at once (the backend does that); collectives
  inside keep them in step. Results come from the last pipeline stage's TP rank 0 of each
  data-parallel replica; other ranks return None.
- forward_backward runs megatron-core's pipeline schedule; Thinker's loss registry plugs into
  its forward step (the last stage gathers the vocab-parallel logits and computes the losses).
  With pipeline parallelism a request's datums go through in several micro-batches (losses are
  sums over datums, so the gradients add up to the whole request's).
"""

from __future__ import annotations

import importlib
import math
import os
from datetime import timedelta

import numpy as np
import torch

from actors.batch import loss_inputs, pack_pass, request_logprobs, request_result
from actors.logprobs import target_logprobs_from_logits
from actors.lora import init_lora_weights
from actors.megatron import cpu as megatron_cpu
from actors.megatron.model import all_pieces
from actors.passes import merge_results
from actors.work import AdamParams, ForwardBackwardResult, ForwardBackwardWork, LoraSpec
from configs.errors import ServerError, UserError


def merge_reports(parts: list) -> ForwardBackwardResult | Exception:
    """One request's parts (micro-batches, data-parallel replicas), merged; or its first error."""
    errors = [p for p in parts if isinstance(p, Exception)]
    return errors[0] if errors else merge_results(parts)


class MegatronRank:
    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(threads)
        megatron_cpu.install()
        self._adapters: dict[str, dict] = {}  # key -> {"lora", "optimizer", "trainable"}

    def address(self) -> tuple[str, int]:
        """This node's address and a free port (rank 0 hosts the rendezvous)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, addr: str, port: int, tp: int, pp: int, config, cache_dir: str, timeout_s: float) -> dict:
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel

        from actors.megatron.model import build

        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
        for module in config.custom_losses:  # the loss registry of this process, as the model actor's
            importlib.import_module(module)
        self._microbatch_target = config.megatron.microbatches
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        with megatron_cpu.cpu_mode():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            tensor_parallel.model_parallel_cuda_manual_seed(config.random_seed)  # megatron's RNG tracker
            self._m = build(config, cache_dir, tp, pp)
        return self.coords()

    def layer_numbers(self) -> list[int]:
        """The global (1-based) numbers of this stage's decoder layers."""
        return [layer.layer_number for layer in self._m.model.decoder.layers]

    def coords(self) -> dict:
        from megatron.core import parallel_state as ps

        return {
            "rank": self.rank,
            "tp": ps.get_tensor_model_parallel_rank(),
            "pp": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(),
            "dp_size": ps.get_data_parallel_world_size(),
            "reports": ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0,
        }

    # ---- adapters -------------------------------------------------------------------------------

    def create_adapter(self, key: str, lora: LoraSpec, alpha: float) -> None:
        """HF's init in HF's module order (over every stage, so all ranks draw the same numbers)."""
        pieces = [p for p in all_pieces(self._m.hf_config) if lora.targets(p.hf_name)]
        full = init_lora_weights([(p.hf_name, p.in_features, p.out_features) for p in pieces], lora.rank, lora.seed)
        self._install(key, full, lora, alpha, trainable=True)

    def import_adapter(self, key: str, full: dict, lora: LoraSpec, alpha: float, trainable: bool, moments=None, step=0):
        self._install(key, full, lora, alpha, trainable)
        if moments:
            entry = self._adapters[key]
            state = entry["optimizer"].state
            for (exp_avg, exp_avg_sq), param in self._param_slots(key, moments):
                state[param] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def export_adapter(self, key: str, with_optimizer: bool):
        """Full HF-shaped (A, B) of this stage's modules (and AdamW moments), on reporting ranks."""
        weights, moments, step = {}, {}, 0
        state = self._adapters[key]["optimizer"].state if with_optimizer and self._adapters[key]["optimizer"] else {}
        for layer in self._m.lora_layers:
            if key not in layer.adapters:
                continue
            weights.update(layer.full(key))
            if not with_optimizer:
                continue
            local = {"exp_avg": {}, "exp_avg_sq": {}}
            for name, w in layer.adapters[key].items():
                for moment, per_piece in local.items():
                    per_piece[name] = tuple(state.get(p, {}).get(moment, torch.zeros_like(p)) for p in (w.A, w.B))
                step = max([step] + [int(state.get(p, {}).get("step", 0)) for p in (w.A, w.B)])
            m_full, v_full = layer.full(key, local["exp_avg"]), layer.full(key, local["exp_avg_sq"])
            for name in m_full:
                moments[f"{name}.A"] = (m_full[name][0], v_full[name][0])
                moments[f"{name}.B"] = (m_full[name][1], v_full[name][1])
        if self.coords()["tp"] != 0:
            return None
        return {"weights": weights, "moments": moments, "step": step}

    def remove_adapter(self, key: str) -> None:
        for layer in self._m.lora_layers:
            layer.adapters.pop(key, None)
        self._adapters.pop(key, None)

    def copy_adapter(self, source: str, key: str) -> None:
        """A frozen copy (a sampler snapshot) of an adapter's current weights."""
        for layer in self._m.lora_layers:
            if source in layer.adapters:
                from actors.lora import LoraWeights

                layer.adapters[key] = {
                    n: LoraWeights(A=w.A.detach().clone(), B=w.B.detach().clone(), scaling=w.scaling)
                    for n, w in layer.adapters[source].items()
                }
        self._adapters[key] = {"lora": self._adapters[source]["lora"], "optimizer": None, "trainable": False}

    # ---- compute --------------------------------------------------------------------------------

    def forward_backward(self, works: list[ForwardBackwardWork], slices: list[tuple[int, int]]):
        """This data-parallel replica's slice of every request, all adapters in one pipeline pass.

        On reporting ranks: per request a ForwardBackwardResult, or the error (UserError or ServerError) when its loss
        raised (that request alone fails; the others' gradients stand).
        """
        from losses import loss_spec

        specs = [loss_spec(w.loss_fn, w.custom_loss) for w in works]
        configs = [spec.resolve_config(w.loss_fn_config) for spec, w in zip(specs, works)]
        trained = sorted({w.model_id for w in works if not w.forward_only and self._adapters[w.model_id]["trainable"]})
        rows = [(r, datum) for r, (w, (a, b)) in enumerate(zip(works, slices)) for datum in w.data[a:b]]
        if not rows:  # more data-parallel replicas than datums: still join the gradient all-reduce
            self._reduce_data_parallel_grads(trained)
            return self._report(None)
        device = self._device()
        micro = []  # per micro-batch: [(request index, its datums here)], in order
        for group in np.array_split(np.arange(len(rows)), self._microbatches(len(rows))):
            runs: list[tuple[int, list]] = []
            for i in group:
                r, datum = rows[i]
                if runs and runs[-1][0] == r:
                    runs[-1][1].append(datum)
                else:
                    runs.append((r, [datum]))
            if runs:
                micro.append(runs)
        batches = [pack_pass([(works[r].model_id, d) for r, d in runs], device) for runs in micro]
        frozen = frozenset(w.model_id for w in works) - frozenset(trained)

        def prepare(index: int) -> None:
            self._m.routing.set(batches[index].row_keys, frozen=frozen)

        def loss_func(index: int, output_tensor):
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            batch = batches[index]
            logits = gather_from_tensor_model_parallel_region(output_tensor)
            flat = target_logprobs_from_logits(logits, batch.targets_BTK)[batch.mask_BT]
            total, reports = output_tensor.sum() * 0, []
            for (r, data), span in zip(micro[index], batch.spans):
                work, spec = works[r], specs[r]
                logprobs = request_logprobs(span, flat)
                try:
                    out = spec(logprobs, loss_inputs(data, spec, device), configs[r])
                    result = request_result(span, logprobs, out)
                except UserError as exc:  # e.g. a custom loss's own mistake: that request fails alone
                    reports.append((r, exc))
                    continue
                except Exception as exc:  # a loss that breaks fails its own request; the pipeline goes on
                    reports.append((r, ServerError(f"loss {work.loss_fn!r} failed: {type(exc).__name__}: {exc}")))
                    continue
                if not work.forward_only and out.loss.requires_grad:
                    total = total + out.loss
                reports.append((r, result))
            # Losses are sums over datums; the schedule divides each micro-batch's loss by their count.
            return total * len(batches), reports

        stored = self._schedule([b.tokens_BT for b in batches], loss_func, forward_only=not trained, prepare=prepare)
        self._reduce_data_parallel_grads(trained)
        if not stored:
            return self._report(None)
        parts: dict[int, list] = {}
        for reports in stored:
            for r, part in reports:
                parts.setdefault(r, []).append(part)
        return self._report([merge_reports(parts[r]) if r in parts else None for r in range(len(works))])

    def _microbatches(self, datums: int) -> int:
        """One pass without pipeline parallelism; else enough micro-batches to keep the stages busy."""
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_world_size()
        if pp == 1:
            return 1
        return max(1, min(datums, self._microbatch_target or 2 * pp))

    def optim_step(self, key: str, adam: AdamParams) -> dict | None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        optimizer = self._adapters[key]["optimizer"]  # None: the adapter has nothing on this stage
        params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
        tp_rank = ps.get_tensor_model_parallel_rank()
        squares = torch.zeros(1, dtype=torch.float64, device=self._device())
        for p in params:  # each unique element once: shards everywhere, replicas on TP rank 0
            if p.grad is not None and (p.tensor_model_parallel or tp_rank == 0):
                squares += p.grad.double().square().sum()
        dist.all_reduce(squares, group=ps.get_model_parallel_group())
        total_norm = math.sqrt(float(squares))
        if adam.grad_clip_norm > 0:
            coef = min(adam.grad_clip_norm / (total_norm + 1e-6), 1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group.update(
                    lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return self._report({"grad_norm:mean": total_norm, "learning_rate:mean": adam.learning_rate})

    def next_logits(self, key: str, tokens: np.ndarray, lengths: list[int], all_positions: bool):
        """Logits at each row's last token ([rows, vocab]), or at every position, on reporting ranks."""
        self._m.routing.set([key or ""], frozen=frozenset([key or ""]))
        tokens_BT = torch.from_numpy(np.array(tokens, dtype=np.int64)).to(self._device())

        def loss_func(output_tensor):
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(output_tensor).float()
            if all_positions:
                return logits.sum() * 0, {"logits": logits.cpu()}
            rows = torch.arange(len(lengths))
            last = logits[rows, torch.tensor(lengths) - 1]
            return logits.sum() * 0, {"logits": last.cpu()}

        stored = self._schedule([tokens_BT], lambda _, output: loss_func(output), forward_only=True)
        return self._report(stored[0]["logits"] if stored else None)

    # ---- helpers ----------------------------------------------------------------------------------

    def _schedule(self, micro_tokens: list[torch.Tensor], loss_func, forward_only: bool, prepare=None) -> list:
        """Megatron's pipeline schedule over micro-batches ([B_i, T_i] token ids each); `loss_func(i,
        output)` scores micro-batch i on the last stage; `prepare(i)` runs before its forward (routing).
        Returns the last stage's reports, in order."""
        from functools import partial

        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            index, tokens = next(data_iterator)
            if prepare is not None:
                prepare(index)
            B, T = tokens.shape
            positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
            return model(input_ids=tokens, position_ids=positions, attention_mask=None), partial(loss_func, index)

        B, T = micro_tokens[0].shape
        with megatron_cpu.cpu_mode(), torch.set_grad_enabled(not forward_only):
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(enumerate(micro_tokens)),
                model=[self._m.model],
                num_microbatches=len(micro_tokens),
                seq_length=T,  # (the stages exchange each micro-batch's real shape: variable_seq_lengths)
                micro_batch_size=B,
                forward_only=forward_only,
            )

    def _install(self, key: str, full: dict, lora: LoraSpec, alpha: float, trainable: bool) -> None:
        params = []
        for layer in self._m.lora_layers:
            mine = {p.hf_name: full[p.hf_name] for p in layer.pieces if p.hf_name in full}
            if not mine:
                continue
            if len(mine) != len(layer.pieces):
                raise UserError("an adapter must cover every piece of a fused megatron linear")
            layer.add(key, mine, alpha / lora.rank, trainable)
            params += [t for w in layer.adapters[key].values() for t in (w.A, w.B)]
        optimizer = torch.optim.AdamW(params) if trainable and params else None
        self._adapters[key] = {"lora": lora, "optimizer": optimizer, "trainable": trainable}

    def _param_slots(self, key: str, moments: dict):
        for layer in self._m.lora_layers:
            for name, w in layer.adapters.get(key, {}).items():
                for which, param in (("A", w.A), ("B", w.B)):
                    if f"{name}.{which}" in moments:
                        full_m, full_v = moments[f"{name}.{which}"]
                        local = (layer.shard(which, t).to(self._device()).clone() for t in (full_m, full_v))
                        yield tuple(local), param

    def _reduce_data_parallel_grads(self, keys: list[str]) -> None:
        """Sum the adapters' gradients over data-parallel replicas (every replica, same key order)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if ps.get_data_parallel_world_size() == 1:
            return
        for key in keys:
            optimizer = self._adapters[key]["optimizer"]  # None: the adapter has nothing on this stage
            for group in optimizer.param_groups if optimizer is not None else []:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=ps.get_data_parallel_group())

    def _report(self, value):
        return value if self.coords()["reports"] else None

    def _device(self) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
