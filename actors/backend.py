"""The narrow interface every compute backend implements, in Tinker verbs.

The model actor owns ordering, de-duplication, threading and checkpoint storage; a backend only
computes, and is called from one thread at a time. Adapters go in and out as PEFT files
(`actors.peft_format`), so a checkpoint written by one backend loads in another. Both backends
(`actors.hf`, `actors.megatron`) implement it; the model actor enforces the limits they share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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


class Backend(Protocol):
    """The Tinker verbs over one base model's adapters, computed synchronously on the caller's
    thread. Implementations: `actors.hf.backend.HFBackend`, `actors.megatron.backend.MegatronBackend`.
    Errors are ThinkerErrors; a bad request must leave every adapter as it was."""

    tokenizer: object | None  # the base model's HF tokenizer, if it has one

    def describe(self) -> ModelDescription: ...

    def close(self) -> None:
        """Release what the backend holds outside its process (rank actors, spill files)."""
        ...

    def init_compute_thread(self) -> None:
        """Called once on the compute thread before any work: thread-local settings."""
        ...

    def create_model(self, work: CreateModelWork) -> ModelInfo: ...

    def get_info(self, model_id: str) -> ModelInfo: ...

    def list_models(self) -> list[str]: ...

    def adapter_counts(self) -> tuple[int, int]:
        """(resident, offloaded) training adapters. NOTE: read from the event loop while the compute
        thread works, so it only takes lengths (atomic under the GIL), never iterates."""
        ...

    def unload_model(self, model_id: str) -> None: ...

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult: ...

    def forward_backward_batch(self, works: list[ForwardBackwardWork]) -> list[ForwardBackwardResult | Exception]:
        """All requests in one pass (different adapters and losses); a bad one fails alone."""
        ...

    def check_forward_backward(self, work: ForwardBackwardWork) -> None: ...

    def optim_step(self, work: OptimStepWork) -> OptimStepResult: ...

    def save_state(self, model_id: str, with_optimizer: bool) -> dict[str, bytes]: ...

    def snapshot_state(self, model_id: str) -> Callable[[], dict[str, bytes]]:
        """The model's state (weights + AdamW) as of now, cheaply; the returned function makes the
        `save_state(..., with_optimizer=True)` files from it later, on another thread."""
        ...

    def load_state(self, model_id: str, files: dict[str, bytes], with_optimizer: bool) -> None: ...

    def create_sampler(self, info: SamplerInfo, files: dict[str, bytes] | None) -> SamplerInfo: ...

    def snapshot_sampler(self, model_id: str, info: SamplerInfo) -> SamplerInfo: ...

    def sampler_state(self, sampler_id: str) -> Callable[[], dict[str, bytes]]:
        """A snapshot sampler's weights as of now; the returned function makes its PEFT files later."""
        ...

    def sampler_info(self, sampler_id: str) -> SamplerInfo: ...

    def list_samplers(self) -> list[str]: ...

    def remove_sampler(self, sampler_id: str) -> None: ...

    def sample(self, works: list[SampleWork]) -> list[SampleResult | Exception]: ...
