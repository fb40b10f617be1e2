"""The narrow interface every compute backend implements, in Tinker verbs.

The model actor owns ordering, de-duplication and threading; a backend only computes, and is
called from one thread at a time. The HF backend implements it now; the Megatron group will
implement the same methods.
"""

from __future__ import annotations

from typing import Protocol

from actors.work import (
    CreateModelWork,
    ForwardBackwardResult,
    ForwardBackwardWork,
    ModelDescription,
    ModelInfo,
    OptimStepResult,
    OptimStepWork,
)


class Backend(Protocol):
    def describe(self) -> ModelDescription: ...

    def create_model(self, work: CreateModelWork) -> ModelInfo: ...

    def get_info(self, model_id: str) -> ModelInfo: ...

    def list_models(self) -> list[str]: ...

    def unload_model(self, model_id: str) -> None: ...

    def forward_backward(self, work: ForwardBackwardWork) -> ForwardBackwardResult: ...

    def optim_step(self, work: OptimStepWork) -> OptimStepResult: ...
