"""Running megatron-core on a machine without CUDA (gloo, fp32): a small shim.

megatron-core hard-codes `torch.cuda.current_device()`, `device="cuda"`, CUDA RNG state and
CUDA type strings in a few places (RoPE, schedules, p2p, grad clipping, the RNG tracker).
`install()` points those at the CPU: a TorchFunctionMode rewrites CUDA devices to the CPU and
fakes the CUDA type strings, and the few `torch.cuda` functions megatron calls become CPU
equivalents. Only installed when CUDA is unavailable.
- NOTE: TorchFunctionMode stacks are thread-local: `cpu_mode()` must be entered on the thread
  that runs megatron code (the rank actor's own methods).
"""

from __future__ import annotations

import contextlib

import torch


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # megatron passes torch.cuda.current_device() (an int) as a device


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # megatron checks CUDA type strings
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None


def install() -> None:
    """Patch the torch.cuda entry points megatron-core calls (idempotent; no-op with CUDA)."""
    if torch.cuda.is_available():
        return
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = torch.manual_seed
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


@contextlib.contextmanager
def cpu_mode():
    """Run megatron code on this thread with CUDA devices mapped to the CPU (no-op with CUDA)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpu():
        yield
