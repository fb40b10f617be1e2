"""Continuous batching: sampling rows join the running decode batch between steps and leave it
the moment they finish.

- A request's prompt is prefilled once (batch 1, no padding) and its KV cache copied to each of
  its samples' rows: a group of N samples of one prompt pays for one prefill, not N.
- Prefill is chunked: each `step()` runs at most `prefill_chunk_tokens` prompt tokens and one
  decode step of every running row, so a long prompt never stalls the rows already decoding.
- Where the model's attention can run packed (`actors.hf.packed_attention`), a step is one
  forward: a token per decode row, then the step's prompt chunks back to back (a prompt's later
  chunk attends to its earlier ones, kept with the request). A forward of a few tokens costs
  about as much as its weights take to read, so prompts that join cost no forward of their own
  (`bench/folded_step.py`). Elsewhere the prompts that fit the budget whole share one batched
  forward (left-padded) before the decode step, and a longer one takes a chunk of its own.
- The running batch is one KV cache in slots (`actors.kv_slots`), left-padded to its longest
  row and written in place: a joining row takes the next slot, a finished row's slot is filled
  by the last row, and columns no row needs any more are given up. Each row keeps its own
  positions, adapter, sampling parameters and generator, so a row's tokens do not depend on what
  it is batched with.
- Rows of a request are admitted together, when the batch has room for all of them; the tenant
  that had the fewest rows admitted goes first.
- At most `max_adapters` distinct adapters decode at once (they must all stay on the layers).
- A request that cannot go on (bad input, cancelled, a fault in its own prefill or its adapter's
  residency, one of its rows failed) fails alone and its rows leave; a fault in the batched
  decode step fails the requests the batch held, never the engine.
- NOTE: `submit` may be called from the event loop while `run` works on the compute thread; they
  share only a deque (atomic appends and pops). Read `busy` only while no `run` is in progress.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from actors.generation import (
    CANCELLED,
    GenOutput,
    GenRow,
    RowState,
    finish,
    left_padded,
    prompt_scores,
    sample_result,
    sample_step,
    scores_prompt,
)
from actors.hf.packed_attention import FOLDED_STEP, PACKED_ATTENTION, FoldedStep
from actors.kv_slots import SlotCache
from actors.logprobs import head_logits
from actors.lora import Routing
from actors.work import SampleResult, SampleWork
from configs.errors import ServerError, ThinkerError, UserError

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    token: Any  # the caller's handle, handed back with the outcome
    work: SampleWork
    rows: list[GenRow] = field(default_factory=list)
    states: list[RowState] = field(default_factory=list)
    prompt: GenOutput | None = None  # prompt log-probs of its first row, once prefilled
    live: int = 0  # rows still decoding
    cache: DynamicCache | None = None  # its own cache while its prompt is prefilled
    prefilled: int = 0  # prompt tokens in that cache
    logits: list[torch.Tensor] = field(default_factory=list)  # prefill logits kept for prompt scores
    past: list | None = None  # folded prefill: the prompt's keys and values so far, per layer


@dataclass
class _Row:
    request: _Request
    index: int  # its place in request.rows
    cached: int  # real tokens in the KV cache (prompt + fed samples)


class DecodeEngine:
    """Sampling requests decoded together, joining and leaving between steps (see the module)."""

    def __init__(
        self,
        model,
        routing: Routing,
        rows_of: Callable[[SampleWork], list[GenRow]],
        keep_resident: Callable[[set[str]], None],
        max_rows: int,
        max_adapters: int,
        prefill_chunk_tokens: int = 512,
        decode: Callable[[list[int]], str] | None = None,
        fold_prefill: bool = True,
    ):
        self._model = model
        self._routing = routing
        self._rows_of = rows_of  # validates a request into its rows (raises ThinkerError)
        self._keep_resident = keep_resident  # the adapters of these sampler ids must be on the layers
        self._max_rows = max_rows
        self._max_adapters = max_adapters
        self._base_key = ""  # the routing key of the base model: needs no adapter slot
        self._chunk = prefill_chunk_tokens
        self._decode = decode
        self._inbox: deque[_Request] = deque()
        self._waiting: list[_Request] = []  # validated, waiting for room
        self._prefilling: list[_Request] = []  # admitted, prompt not yet fully in a cache
        self._rows: list[_Row] = []  # decoding now, row i in slot i of the batch cache
        self._kv: SlotCache | None = None
        self._served: dict[str | None, int] = {}  # tenant -> rows admitted (raised to the floor when idle)
        self.steps = 0  # decode steps run (for tests and metrics)
        # joining prompts prefill inside the decode step's forward, where the attention can (packed)
        self._folds = fold_prefill and getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION

    # ---- the event loop's side -----------------------------------------------------------------

    def submit(self, work: SampleWork, token: Any) -> None:
        self._inbox.append(_Request(token, work))

    @property
    def busy(self) -> bool:
        """Whether `step` has anything to do."""
        return bool(self._inbox or self._prefilling or self._rows or self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows) + sum(len(r.rows) for r in self._prefilling)

    # ---- the compute thread's side ----------------------------------------------------------------

    def run(self, seconds: float) -> list[tuple[Any, SampleResult | ThinkerError]]:
        """Steps until `seconds` have passed (at least one) or nothing is left to do; the requests
        that finished meanwhile, each with its result or the error that failed it."""
        start = time.monotonic()
        finished: list[tuple[Any, SampleResult | ThinkerError]] = []
        while True:
            try:
                self.step(finished)
            except Exception as exc:  # a bug or a device fault: fail what the batch held, go on empty
                logger.exception("a decode step failed")
                self._reset(finished, ServerError(f"sampling failed: {type(exc).__name__}: {exc}"))
            if not self.busy or time.monotonic() - start >= seconds:
                return finished

    @torch.no_grad()
    def step(self, finished: list) -> None:
        """One prefill chunk (when a request waits) and one decode step; finished requests are appended."""
        self._take_inbox(finished)
        self._admit(finished)
        self._make_resident(finished)
        if self._folds:
            self._folded_step(self._chunks(finished), finished)
            return
        together = self._prefill(finished)
        if len(together) > 1:
            together = self._prefill_together(together, finished)
        for request in together:  # alone, or again alone after a batched prefill failed
            self._prefill_alone(request, len(request.rows[0].prompt), finished)
        if self._rows:
            self._decode_step(finished)

    def _make_resident(self, finished: list) -> None:
        """Every admitted request's adapter on the layers; the requests of one that cannot be fail."""
        active = self._adapter_ids()
        if not active:
            return
        try:
            self._keep_resident(active)
            return
        except Exception:  # find the sampler(s) at fault
            pass
        for sampler_id in sorted(active):
            try:
                self._keep_resident({sampler_id})
            except Exception as exc:
                error = _as_error(exc, f"sampler {sampler_id!r} could not be loaded")
                admitted = self._prefilling + list({id(r.request): r.request for r in self._rows}.values())
                self._fail([r for r in admitted if r.work.sampler_id == sampler_id], error, finished)
        remaining = self._adapter_ids()
        if remaining:
            self._keep_resident(remaining)

    def _fail(self, requests: list[_Request], error: ThinkerError, finished: list) -> None:
        """These requests fail with `error`; their rows leave the batch."""
        failing = {id(r) for r in requests}
        finished += [(r.token, error) for r in requests]
        self._prefilling = [r for r in self._prefilling if id(r) not in failing]
        self._waiting = [r for r in self._waiting if id(r) not in failing]
        keep = [i for i, row in enumerate(self._rows) if id(row.request) not in failing]
        if len(keep) < len(self._rows):
            self._drop(keep)

    def _reset(self, finished: list, error: ThinkerError) -> None:
        failed = {id(r): r for r in self._prefilling} | {id(row.request): row.request for row in self._rows}
        finished += [(request.token, error) for request in failed.values()]
        self._prefilling, self._rows, self._kv = [], [], None

    def _adapter_ids(self) -> set[str]:
        """The sampler ids of the admitted requests that sample through an adapter."""
        requests = self._prefilling + [row.request for row in self._rows]
        return {r.work.sampler_id for r in requests if r.rows[0].key != self._base_key}

    def _take_inbox(self, finished: list) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            try:
                request.rows = self._rows_of(request.work)
                if len(request.rows) > self._max_rows:
                    raise UserError(f"{len(request.rows)} samples in one request; at most {self._max_rows}")
            except Exception as exc:  # NOTE: popped already: every way out must answer it
                finished.append((request.token, _as_error(exc, "sampling request could not be prepared")))
                continue
            request.states = [RowState() for _ in request.rows]
            self._waiting.append(request)

    def _admit(self, finished: list) -> None:
        """Waiting requests in turn: the tenant that had the fewest rows admitted first (tenants
        with nothing waiting bank no credit), then arrival order; the chosen one waits (and the
        others behind it) until all its rows fit."""
        self._fail([r for r in self._waiting if _cancelled(r)], UserError(CANCELLED), finished)
        while True:
            candidates = self._waiting
            if not candidates:
                return
            tenants = {r.work.tenant for r in candidates}
            floor = min(self._served.get(t, 0) for t in tenants)
            for tenant in self._served.keys() - tenants:
                self._served[tenant] = max(self._served[tenant], floor)
            request = min(candidates, key=lambda r: self._served.get(r.work.tenant, floor))  # stable: arrival
            adapters = self._adapter_ids()
            if request.rows[0].key != self._base_key:
                adapters.add(request.work.sampler_id)
            if len(request.rows) > self._max_rows - self.running_rows or len(adapters) > self._max_adapters:
                return
            self._waiting.remove(request)
            self._served[request.work.tenant] = self._served.get(request.work.tenant, floor) + len(request.rows)
            self._prefilling.append(request)

    def _prefill(self, finished: list) -> list[_Request]:
        """Prompt tokens of admitted requests, up to the chunk budget: a prompt longer than what is
        left (or one whose prompt is scored) takes a chunk of its own now; the prompts that fit
        whole are returned, to be prefilled together."""
        budget = self._chunk
        together, width = [], 0  # the batched forward costs len(together) x width tokens, padding included
        for request in list(self._prefilling):
            left = budget - len(together) * width
            if left <= 0:
                break
            if _cancelled(request):
                self._fail([request], UserError(CANCELLED), finished)
                continue
            remaining = len(request.rows[0].prompt) - request.prefilled
            wider = max(width, remaining)
            if request.prefilled == 0 and (len(together) + 1) * wider <= budget and not scores_prompt(request.rows[0]):
                together.append(request)
                width = wider
                continue
            budget -= self._prefill_alone(request, left, finished)
        return together

    def _prefill_alone(self, request: _Request, budget: int, finished: list) -> int:
        """`_prefill_chunk`, where a fault (e.g. out of memory for a long prompt) fails the request
        alone; the prompt tokens it took."""
        try:
            return self._prefill_chunk(request, budget, finished)
        except Exception as exc:
            self._prefill_failed(request, exc, finished)
            return 0

    def _prefill_failed(self, request: _Request, exc: Exception, finished: list) -> None:
        logger.exception("prefill failed")
        self._fail([request], _as_error(exc, "sampling failed in the prompt's prefill"), finished)

    def _prefill_together(self, requests: list[_Request], finished: list) -> list[_Request]:
        """Whole prompts of several requests in one forward (left-padded, like the static batch);
        each request's rows then join with its own part of the keys and values. Returns the
        requests to prefill alone instead: all of them if the batched forward failed (so that
        only a request at fault fails), else none."""
        lengths = [len(r.rows[0].prompt) for r in requests]
        ids, mask, positions = left_padded([r.rows[0].prompt for r in requests], self._device)
        width = ids.shape[1]
        cache = DynamicCache()
        try:
            self._routing.set([r.rows[0].key for r in requests])
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception:
            logger.exception("a batched prefill failed; its requests are prefilled one by one")
            return requests
        for i, request in enumerate(requests):
            start = width - lengths[i]
            kv = [(layer.keys[i : i + 1, :, start:], layer.values[i : i + 1, :, start:]) for layer in cache.layers]
            request.prefilled, request.cache = lengths[i], None
            self._join_alone(request, out.logits[i, -1:].float(), kv, finished)
        return []

    def _prefill_chunk(self, request: _Request, budget: int, finished: list) -> int:
        """Up to `budget` more prompt tokens of `request` into its cache (the rows join the batch
        when the prompt is done); the tokens it took."""
        prompt = request.rows[0].prompt
        start = request.prefilled
        end = min(len(prompt), start + budget)
        ids = torch.as_tensor(prompt[start:end], dtype=torch.long, device=self._device)[None]
        positions = torch.arange(start, end, device=self._device)[None]
        keep_all = scores_prompt(request.rows[0])
        if request.cache is None:
            request.cache = DynamicCache()
        self._routing.set([request.rows[0].key])
        out = self._model(
            input_ids=ids,
            position_ids=positions,
            cache=request.cache,
            use_cache=True,
            logits_to_keep=0 if keep_all else 1,
        )
        request.prefilled = end
        if keep_all:
            request.logits.append(out.logits[0])
        if end == len(prompt):
            kv = [(layer.keys, layer.values) for layer in request.cache.layers]
            self._join(request, out.logits[0, -1:].float(), kv, finished)
        return end - start

    def _join_alone(self, request: _Request, last_1V: torch.Tensor, kv: list, finished: list) -> None:
        """`_join`, where a fault (e.g. no memory for its rows) fails the request alone."""
        try:
            self._join(request, last_1V, kv, finished)
        except Exception as exc:
            logger.exception("joining the batch failed")
            self._fail([request], _as_error(exc, "sampling failed when its rows joined the batch"), finished)

    def _join(self, request: _Request, last_1V: torch.Tensor, kv: list, finished: list) -> None:
        """The prompt is prefilled (`kv`: its keys and values per layer, [1, heads, prompt, dim]):
        sample each row's first token and move the live rows into the batch (one copy of the
        prompt's keys and values per row)."""
        logits = torch.cat(request.logits) if request.logits else None
        request.prompt = prompt_scores(logits, request.rows[0], 0) if logits is not None else GenOutput(None)
        request.logits = []
        n = len(request.rows)
        sample_step(last_1V.expand(n, -1), request.rows, request.states, self._decode)
        live = [i for i, s in enumerate(request.states) if s.stop_reason is None]
        if any(s.error is not None for s in request.states):  # the request fails: no row goes on
            live = []
        if not live:
            self._prefilling.remove(request)
            finished.append((request.token, self._outputs(request)))
            return
        length = len(request.rows[0].prompt)
        pairs = [(k.expand(len(live), -1, -1, -1), v.expand(len(live), -1, -1, -1)) for k, v in kv]
        self._merge(pairs, length)  # NOTE: the batch changes only once this succeeded
        self._prefilling.remove(request)
        request.cache = None
        request.live = len(live)
        self._rows += [_Row(request, i, length) for i in live]

    def _merge(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Append rows whose caches hold `length` tokens each to the batch cache (the next slots)."""
        if self._kv is None:
            self._kv = SlotCache(self._max_rows)
        self._kv.append(pairs, length)

    def _decode_step(self, finished: list) -> None:
        rows = self._rows
        ids = torch.tensor([[r.request.states[r.index].tokens[-1]] for r in rows], device=self._device)
        cached = torch.tensor([r.cached for r in rows], device=self._device)
        self._kv.reserve(1)
        mask = self._kv.mask(cached, extra=1)
        self._routing.set([r.request.rows[r.index].key for r in rows])
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=cached[:, None], cache=self._kv.cache, use_cache=True
        )
        self._decoded(out.logits[:, -1, :].float(), finished)

    def _chunks(self, finished: list) -> list[tuple[_Request, int]]:
        """The prompt tokens this step prefills, up to the chunk budget, in admission order: each
        (request, end), its tokens from `prefilled` to `end`; the chunks that start a prompt first."""
        budget, chunks = self._chunk, []
        for request in list(self._prefilling):
            if budget <= 0:
                break
            if _cancelled(request):
                self._fail([request], UserError(CANCELLED), finished)
                continue
            end = min(len(request.rows[0].prompt), request.prefilled + budget)
            chunks.append((request, end))
            budget -= end - request.prefilled
        return sorted(chunks, key=lambda chunk: chunk[0].past is not None)  # as FoldedStep wants them

    def _folded_step(self, chunks: list[tuple[_Request, int]], finished: list) -> None:
        """One forward that is the decode step of the running rows and the prefill of this step's
        prompt chunks (`actors.hf.packed_attention.FoldedStep`): on a CPU each forward costs about
        as much as reading the weights, so joining prompts no longer cost a forward of their own.
        If it fails, the chunks run one by one and then the decode step, so that only a request at
        fault fails (a fault in the decode step alone fails the batch, as `run` handles)."""
        if not chunks and not self._rows:
            return
        try:
            fold, logits_KV = self._fold_forward(self._rows, chunks)
        except Exception:
            if not chunks:
                raise
            logger.exception("a folded step failed; its prompt chunks and decode step run apart")
        else:
            n = len(self._rows)
            if n:
                self._decoded(logits_KV[:n], finished)
            self._prefilled(chunks, fold, logits_KV[n:], finished)
            return
        for chunk in chunks:
            try:
                fold, logits_KV = self._fold_forward([], [chunk])
            except Exception as exc:
                self._prefill_failed(chunk[0], exc, finished)
                continue
            self._prefilled([chunk], fold, logits_KV, finished)
        if self._rows:
            fold, logits_KV = self._fold_forward(self._rows, [])
            self._decoded(logits_KV, finished)

    def _fold_forward(self, rows: list[_Row], chunks: list[tuple[_Request, int]]) -> tuple[FoldedStep, torch.Tensor]:
        """The folded forward of a decode step of `rows` and these prompt chunks: its FoldedStep
        (the chunks' keys and values) and the logits [K, vocab] of the rows, then of each chunk's
        positions that need one (all of a scored prompt's, else a finished prompt's last). What it
        changes stays invisible if it fails: the routing, the slot cache's room (`reserve`) and
        the keys and values written just after its window."""
        device, n = self._device, len(rows)
        cached = torch.tensor([r.cached for r in rows], dtype=torch.long)
        ids = [r.request.states[r.index].tokens[-1] for r in rows]
        positions, keep, lengths = [cached], list(range(n)), []
        for request, end in chunks:
            start = request.prefilled
            ids += [int(t) for t in request.rows[0].prompt[start:end]]
            positions.append(torch.arange(start, end))
            at = n + sum(lengths) + end - start  # just after the chunk
            keep += range(at - _logits_kept(request, end), at)
            lengths.append(end - start)
        ids_1N = torch.tensor(ids, dtype=torch.long, device=device)[None]
        keep_K = torch.tensor(keep, dtype=torch.long, device=device)
        mask = None
        if n:
            self._kv.reserve(1)
            mask = self._kv.mask(cached.to(device), extra=1).bool()[:, None, None, :]
        fold = FoldedStep(self._kv if n else None, mask, n, lengths, [request.past for request, _ in chunks])
        keys = [r.request.rows[r.index].key for r in rows] + [request.rows[0].key for request, _ in chunks]
        self._routing.set(keys, row_tokens=[1] * n + lengths)
        hidden_1ND = self._model.model(
            input_ids=ids_1N,
            position_ids=torch.cat(positions).to(device)[None],
            attention_mask=torch.ones_like(ids_1N, dtype=torch.bool),
            use_cache=False,
            **{FOLDED_STEP: fold},
        ).last_hidden_state
        if not keep:
            return fold, hidden_1ND.new_zeros(0, 0)
        with self._routing.narrow(keep_K):
            return fold, head_logits(self._model, hidden_1ND[0, keep_K]).float()

    def _prefilled(
        self, chunks: list[tuple[_Request, int]], fold: FoldedStep, logits_KV: torch.Tensor, finished: list
    ) -> None:
        """A folded forward prefilled these chunks (`logits_KV`: the positions `_fold_forward`
        kept, from the first chunk's on): a prompt that is done joins the batch, one that is not
        keeps its keys and values for its next chunk."""
        at = 0
        for i, (request, end) in enumerate(chunks):
            row = request.rows[0]
            kept = _logits_kept(request, end)
            logits = logits_KV[at : at + kept]
            at += kept
            request.prefilled = end
            if scores_prompt(row):
                request.logits.append(logits.clone())  # not a view that keeps the whole step's logits
            kv = fold.prompt_cache(i)
            if end < len(row.prompt):  # copies, not views that keep the whole step's keys and values
                request.past = [(k.clone(), v.clone()) for k, v in kv]
                continue
            request.past = None
            self._join_alone(request, logits[-1:], kv, finished)

    def _decoded(self, logits_BV: torch.Tensor, finished: list) -> None:
        """The decode step's forward is done (its keys and values written at hi): sample each row's
        next token from its logits; finished rows leave."""
        rows = self._rows
        self._kv.advance(1)
        self.steps += 1
        for row in rows:
            row.cached += 1
        gen_rows = [r.request.rows[r.index] for r in rows]
        states = [r.request.states[r.index] for r in rows]
        sample_step(logits_BV, gen_rows, states, self._decode)
        failed = {id(r.request) for r, state in zip(rows, states) if state.error is not None}
        for row, state in zip(rows, states):  # a request with a failed row fails: its other rows stop
            if id(row.request) in failed and state.stop_reason is None:
                state.stop_reason = "error"
        keep = [i for i, s in enumerate(states) if s.stop_reason is None]
        for i, row in enumerate(rows):
            if states[i].stop_reason is not None:
                row.request.live -= 1
                if row.request.live == 0:
                    finished.append((row.request.token, self._outputs(row.request)))
        if len(keep) < len(rows):
            self._drop(keep)

    def _drop(self, keep: list[int]) -> None:
        """Keep only these rows of the batch (ascending), and give up columns that are padding for
        every row left."""
        if not keep:
            self._rows, self._kv = [], None
            return
        kept = {slot: self._rows[slot] for slot in keep}
        self._rows = list(kept.values())  # NOTE: first, so a failure below never answers a finished row twice
        order = self._kv.keep(keep, max(row.cached for row in self._rows))
        self._rows = [kept[slot] for slot in order]

    def _outputs(self, request: _Request) -> SampleResult | ThinkerError:
        outputs = [finish(state, GenOutput(None)) for state in request.states]
        first = request.prompt or GenOutput(None)
        outputs[0].prompt_logprobs = first.prompt_logprobs
        outputs[0].topk_ids, outputs[0].topk_logprobs = first.topk_ids, first.topk_logprobs
        outputs[0].target_logprobs = first.target_logprobs
        return sample_result(outputs)

    @property
    def _device(self) -> torch.device:
        return next(self._model.parameters()).device


def _logits_kept(request: _Request, end: int) -> int:
    """How many of a prompt chunk's last positions (tokens `prefilled` to `end`) need logits: all
    of a scored prompt's, the last of a prompt the chunk finishes, else none."""
    row = request.rows[0]
    if scores_prompt(row):
        return end - request.prefilled
    return int(end == len(row.prompt))


def _cancelled(request: _Request) -> bool:
    check = request.rows[0].cancelled
    return check is not None and check()


def _as_error(exc: Exception, what: str) -> ThinkerError:
    if isinstance(exc, ThinkerError):
        return exc
    return ServerError(f"{what}: {type(exc).__name__}: {exc}")
