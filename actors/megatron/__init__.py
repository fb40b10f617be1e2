"""The Megatron-core backend: a group of rank actors (TP x PP x DP) serving one base model.

backend.py (MegatronBackend, the model actor's side), group.py (the placement group of ranks),
rank.py (one rank: model shard, LoRA, pipeline schedule), model.py (building the GPTModel from an
HF checkpoint), lora.py (tensor-parallel LoRA), weights.py (HF shards), cpu.py (gloo on CPU).
Never imports `actors.hf`; shared pieces live in `actors/`.
"""
