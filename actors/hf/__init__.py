"""The transformers backend: one process holds the base model and every adapter over it.

backend.py (HFBackend), adapters.py (the adapter table, AdamW, offloading), samplers.py
(sampler snapshots), base_model.py (loading the transformers model), export.py (`thinker export`).
Never imports `actors.megatron`; shared pieces live in `actors/`.
"""
