"""Building one rank's megatron-core GPTModel (local spec, no transformer-engine or apex) from a
Hugging Face Llama-family config, loading its shard, and wrapping its linears with LoRA.

Called inside a rank actor, after torch.distributed and megatron's parallel state are set up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors.lora import Routing
from actors.megatron.lora import MegatronLoraLinear, Piece
from actors.megatron.weights import load_shard, safetensors_reader
from actors.model_source import DTYPES, resolve_source


@dataclass
class RankModel:
    model: torch.nn.Module  # the GPTModel shard
    hf_config: object
    lora_layers: list[MegatronLoraLinear]
    routing: Routing
    pieces: list[Piece]  # every HF LoRA module on this stage, in HF order


def hf_source(config, cache_dir: str):
    """(HF config, name -> tensor reader) for a BaseModelConfig, on this rank's machine."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if config.random_init is not None:  # tests: rebuild the same seeded random weights here
        hf_config = LlamaConfig(**config.random_init)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.random_seed)
            state = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).state_dict()
        return hf_config, state.__getitem__
    folder = resolve_source(config, cache_dir)
    import os

    if not os.path.isdir(folder):  # a hub id: fetch (when a hub is reachable)
        from huggingface_hub import snapshot_download

        folder = snapshot_download(folder, allow_patterns=["*.json", "*.safetensors"])
    return AutoConfig.from_pretrained(folder), safetensors_reader(folder)


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def build(config, cache_dir: str, tp: int, pp: int) -> RankModel:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    hf_config, read = hf_source(config, cache_dir)
    dtype = DTYPES[config.dtype]
    mcfg = TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim_of(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_in_last_pipeline_stage=config.megatron.last_stage_layers if pp > 1 else None,
        sequence_parallel=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        variable_seq_lengths=pp > 1,  # micro-batches differ in rows and length: stages exchange shapes
        moe_token_dispatcher_type="alltoall",  # (no MoE here; the default one refuses variable lengths)
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=mcfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
    )
    if torch.cuda.is_available():
        model = model.cuda()
    load_shard(model, read, hf_config, parallel_state.get_tensor_model_parallel_rank(), tp)
    model.requires_grad_(False)
    model.eval()
    routing = Routing()
    layers = install_lora(model, hf_config, routing)
    pieces = [p for layer in layers for p in layer.pieces]
    return RankModel(model=model, hf_config=hf_config, lora_layers=layers, routing=routing, pieces=pieces)


def head_dim_of(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def layer_pieces(hf_config, index: int) -> dict[str, list[Piece]]:
    """HF's LoRA modules of decoder layer `index` (0-based), by the megatron linear that holds them."""
    H, F_ = hf_config.hidden_size, hf_config.intermediate_size
    NH, NKV, D = hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim_of(hf_config)
    prefix = f"model.layers.{index}."
    return {
        "linear_qkv": [
            Piece(prefix + "self_attn.q_proj", NH * D, H),
            Piece(prefix + "self_attn.k_proj", NKV * D, H),
            Piece(prefix + "self_attn.v_proj", NKV * D, H),
        ],
        "linear_proj": [Piece(prefix + "self_attn.o_proj", H, NH * D)],
        "linear_fc1": [Piece(prefix + "mlp.gate_proj", F_, H), Piece(prefix + "mlp.up_proj", F_, H)],
        "linear_fc2": [Piece(prefix + "mlp.down_proj", H, F_)],
    }


def lm_head_piece(hf_config) -> Piece:
    return Piece("lm_head", hf_config.vocab_size, hf_config.hidden_size)


def all_pieces(hf_config) -> list[Piece]:
    """Every HF LoRA module of the whole model, in HF's order (all stages, not just this one)."""
    layers = [p for i in range(hf_config.num_hidden_layers) for ps in layer_pieces(hf_config, i).values() for p in ps]
    return layers + [lm_head_piece(hf_config)]


def install_lora(model, hf_config, routing: Routing) -> list[MegatronLoraLinear]:
    """Wrap each layer's linears (and the output layer) with LoRA holding HF's module pieces."""
    heads = (hf_config.num_attention_heads, hf_config.num_key_value_heads, head_dim_of(hf_config))
    layers = []
    for layer in model.decoder.layers:
        pieces = layer_pieces(hf_config, layer.layer_number - 1)
        attn, mlp = layer.self_attention, layer.mlp
        attn.linear_qkv = MegatronLoraLinear(attn.linear_qkv, pieces["linear_qkv"], True, "qkv", routing, heads=heads)
        attn.linear_proj = MegatronLoraLinear(attn.linear_proj, pieces["linear_proj"], False, "single", routing)
        mlp.linear_fc1 = MegatronLoraLinear(mlp.linear_fc1, pieces["linear_fc1"], True, "concat", routing)
        mlp.linear_fc2 = MegatronLoraLinear(mlp.linear_fc2, pieces["linear_fc2"], False, "single", routing)
        layers += [attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2]
    if getattr(model, "post_process", False):
        model.output_layer = MegatronLoraLinear(model.output_layer, [lm_head_piece(hf_config)], True, "single", routing)
        layers.append(model.output_layer)
    return layers
