"""Target log-probs without holding the whole [rows, tokens, vocab] logits tensor.

The decoder runs once; the LM head and log-softmax then run over slices of positions, each
slice checkpointed (recomputed in backward), so at most one slice of logits is alive at a time.
With a 49k vocabulary the full logits of an 8k-token pass alone would take 1.6 GB, and their
softmax gradient as much again. Slices are large (the recompute costs the LM head's forward
again): passes that fit in one slice run exactly as without slicing.

A packed pass (`scored_logprobs`, rows back to back in one [1, N] sequence) runs the LM head on
its scored positions only; its head slices route their LoRA through `narrow`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch.utils.checkpoint import checkpoint

LOGITS_PER_SLICE = 128 * 1024 * 1024  # floats of logits computed at once (512 MB in fp32)


def target_logprobs_from_logits(logits_BTV: torch.Tensor, targets_BTK: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] for every position and candidate: [B, T, K], float32."""
    logits = logits_BTV.float()
    return logits.gather(-1, targets_BTK) - torch.logsumexp(logits, dim=-1, keepdim=True)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of decoder outputs `hidden` as the model's own forward makes them: its LM head,
    then the output scaling some architectures apply (Granite divides by `logits_scaling`, Cohere
    multiplies by `logit_scale`, Gemma 2 soft-caps at `final_logit_softcapping`)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    if getattr(model, "logit_scale", None) is not None:
        logits = logits * model.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def head_is_separable(model) -> bool:
    """Whether the model's decoder (`.model`) and `head_logits` give its own forward's logits,
    checked once on a few tokens: then the head can run on chosen positions only (packed passes,
    folded decode steps). An architecture that does anything else to its logits is not."""
    if getattr(model, "model", None) is None or model.get_output_embeddings() is None:
        return False
    device = next(model.parameters()).device
    ids = (torch.arange(1, 9, device=device) % model.config.vocab_size)[None]
    want = model(input_ids=ids, use_cache=False).logits.float()
    got = head_logits(model, model.model(input_ids=ids, use_cache=False).last_hidden_state).float()
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3)


def target_logprobs(
    model,
    tokens_BT: torch.Tensor,
    targets_BTK: torch.Tensor,
    logits_per_slice: int = LOGITS_PER_SLICE,
    separable: bool = True,
) -> torch.Tensor:
    """[B, T, K] log-probs of the targets under a causal LM with a `.model` decoder and an LM head
    (`separable`: see `head_is_separable`)."""
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if decoder is None or head is None or not separable:  # an unusual architecture: the plain, memory-hungry way
        return target_logprobs_from_logits(model(input_ids=tokens_BT, use_cache=False).logits, targets_BTK)
    hidden_BTH = decoder(input_ids=tokens_BT, use_cache=False).last_hidden_state
    B, T, _ = hidden_BTH.shape
    step = max(1, logits_per_slice // (B * head.weight.shape[0]))

    def head_logprobs(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return target_logprobs_from_logits(head_logits(model, hidden), targets)

    slices = []
    for start in range(0, T, step):
        hidden, targets = hidden_BTH[:, start : start + step], targets_BTK[:, start : start + step]
        if torch.is_grad_enabled() and T > step:
            slices.append(checkpoint(head_logprobs, hidden, targets, use_reentrant=False))
        else:
            slices.append(head_logprobs(hidden, targets))
    return torch.cat(slices, dim=1)


def scored_logprobs(
    model,
    tokens_1N: torch.Tensor,
    targets_SK: torch.Tensor,
    scored_S: torch.Tensor,
    narrow: Callable[[torch.Tensor], AbstractContextManager],
    logits_per_slice: int = LOGITS_PER_SLICE,
    **forward,
) -> torch.Tensor:
    """[S, K] log-probs of the targets at positions `scored_S` of one packed sequence; `forward`
    goes to the decoder (position ids, packed attention's lengths). `narrow(positions)` routes the
    LM head's LoRA layers to the positions of one slice (see `actors.lora.Routing.narrow`)."""
    decoder, head = model.model, model.get_output_embeddings()
    hidden_SH = decoder(input_ids=tokens_1N, use_cache=False, **forward).last_hidden_state[0, scored_S]
    S = hidden_SH.shape[0]
    step = max(1, logits_per_slice // head.weight.shape[0])

    def head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with narrow(positions):  # inside the checkpointed function: its recompute routes the same way
            return target_logprobs_from_logits(head_logits(model, hidden), targets)

    slices = []
    for start in range(0, S, step):
        part = slice(start, start + step)
        inputs = (hidden_SH[part], targets_SK[part], scored_S[part])
        if torch.is_grad_enabled() and S > step:
            slices.append(checkpoint(head_logprobs, *inputs, use_reentrant=False))
        else:
            slices.append(head_logprobs(*inputs))
    return torch.cat(slices)
