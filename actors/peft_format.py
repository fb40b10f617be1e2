"""Adapters on disk in PEFT's format, and their AdamW state beside them.

- `adapter_model.safetensors` + `adapter_config.json` form a standard PEFT LoRA folder:
  `peft.PeftModel.from_pretrained(base, folder)` loads it (keys
  `base_model.model.<module>.lora_A.weight`, r, lora_alpha, target_modules by leaf name).
- `optimizer.safetensors` holds each parameter's AdamW moments and step under the same key
  plus `.exp_avg`, `.exp_avg_sq`, `.step`; present only in training checkpoints.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from actors.lora import LoraWeights

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.lora_{which}.weight"


def adapter_files(weights: dict[str, LoraWeights], rank: int, alpha: float, base_model: str) -> dict[str, bytes]:
    tensors = {}
    for name, w in weights.items():
        tensors[peft_key(name, "A")] = w.A.detach().to("cpu", torch.float32).contiguous()
        tensors[peft_key(name, "B")] = w.B.detach().to("cpu", torch.float32).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in weights}),
    }
    return {ADAPTER_FILE: save_safetensors(tensors), CONFIG_FILE: json.dumps(config, indent=1).encode()}


def read_adapter(files: dict[str, bytes]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """module name -> (A, B), and the PEFT config."""
    tensors = load_safetensors(files[ADAPTER_FILE])
    config = json.loads(files[CONFIG_FILE])
    modules = {
        key[len("base_model.model.") : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")
    }
    return {m: (tensors[peft_key(m, "A")], tensors[peft_key(m, "B")]) for m in modules}, config


def optimizer_file(moments: dict[str, tuple[torch.Tensor, torch.Tensor]], step: int) -> bytes:
    """AdamW state: per parameter ("<module>.A" / ".B") its moments, under its PEFT key."""
    tensors = {}
    for key, (exp_avg, exp_avg_sq) in moments.items():
        name, which = key.rsplit(".", 1)
        prefix = peft_key(name, which)
        tensors[f"{prefix}.exp_avg"] = exp_avg.detach().cpu().contiguous()
        tensors[f"{prefix}.exp_avg_sq"] = exp_avg_sq.detach().cpu().contiguous()
        tensors[f"{prefix}.step"] = torch.tensor([float(step)])
    return save_safetensors(tensors)


def read_optimizer(data: bytes) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """The inverse of `optimizer_file`: ("<module>.A" / ".B" -> (exp_avg, exp_avg_sq)), and the step."""
    tensors = load_safetensors(data)
    moments, step = {}, 0
    for key in tensors:
        if key.endswith(".exp_avg"):
            prefix = key[: -len(".exp_avg")]  # base_model.model.<module>.lora_<A|B>.weight
            name, which = prefix[len("base_model.model.") : -len(".weight")].rsplit(".lora_", 1)
            moments[f"{name}.{which}"] = (tensors[key], tensors[f"{prefix}.exp_avg_sq"])
            step = max(step, int(tensors[f"{prefix}.step"].item()))
    return moments, step


def load_optimizer_state(data: bytes, moments: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Copy the saved moments into the adapter's (missing ones start at zero); returns the step."""
    saved, step = read_optimizer(data)
    with torch.no_grad():
        for key, (exp_avg, exp_avg_sq) in moments.items():
            if key in saved:
                exp_avg.copy_(saved[key][0])
                exp_avg_sq.copy_(saved[key][1])
            else:
                exp_avg.zero_()
                exp_avg_sq.zero_()
    return step
