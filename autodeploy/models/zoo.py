"""The model zoo: tiny configs of the transformers families autodeploy supports.

Each entry builds a transformers model from a config with random weights drawn from a fixed seed,
small enough for a 2-core CPU, yet with every feature the family has switched on (GQA, sliding
windows shorter than the test prompts, soft-caps, Mamba2 groups and chunking). Nothing is
downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VOCAB = 256
HIDDEN = 64


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        sliding_window=24,
    )


def _gemma2() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        sliding_window=20, attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
        query_pre_attn_scalar=24, attn_implementation="eager",
    )


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        sliding_window=16, layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )


def _nemotron_h() -> Any:
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
        layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4,
        expand=2, chunk_size=16,
    )


def _bamba() -> Any:
    from transformers import BambaConfig

    return BambaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16,
    )


def _mamba2() -> Any:
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_heads=8, head_dim=16,
        expand=2, state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    )


def _hybrid() -> Any:
    from .hybrid import HybridConfig

    return HybridConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
        layers_block_type=["linear_attention", "mlp", "sliding_attention", "mlp",
                           "linear_attention", "mlp", "full_attention", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        sliding_window=24, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16, n_groups=2,
        # initializer_range: strong enough that a wrong state changes tokens
        conv_kernel=4, expand=2, chunk_size=16, initializer_range=0.1,
    )


# name -> (config factory, class name in transformers or in autodeploy.models.hybrid)
ZOO: dict[str, tuple[Callable[[], Any], str]] = {
    "hybrid": (_hybrid, "HybridForCausalLM"),
    "llama": (_llama, "LlamaForCausalLM"),
    "mistral": (_mistral, "MistralForCausalLM"),
    "gemma2": (_gemma2, "Gemma2ForCausalLM"),
    "gemma3": (_gemma3, "Gemma3ForCausalLM"),
    "nemotron_h": (_nemotron_h, "NemotronHForCausalLM"),
    "bamba": (_bamba, "BambaForCausalLM"),
    "mamba2": (_mamba2, "Mamba2ForCausalLM"),
}


def _bench_hybrid_06b() -> Any:
    """The hybrid benchmark model: NemotronH-style, 0.59 B parameters, 18 layers (8 Mamba2 mixers,
    8 MLPs, 2 full-attention layers with 4 KV heads), for the decode, prefill and speculation
    benchmarks and the GPU tests."""
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=6144, num_hidden_layers=18,
        hybrid_override_pattern="M-M-M*-M-M-M*-M-M-", num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
        max_position_embeddings=8192,
    )


def _bench_swa_07b() -> Any:
    """A Gemma3-style sliding-window model of similar size: 5 sliding (W=1024) : 1 full layers,
    0.71 B parameters, for the sliding-window memory and decode benchmarks."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=18,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, sliding_window=1024,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=131072,
    )


def _bench_gemma3_270m() -> Any:
    """Gemma 3 270M's architecture (the config of the released checkpoint: 18 layers, hidden 640,
    4 query heads and 1 KV head of 256, 5 sliding (W=512) : 1 full layers, a 262k vocabulary tied
    to the embedding; 268 M parameters, 536 MB in bf16) with random weights: decode speed depends on
    the shapes, not on the values, and these need no download."""
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768,
        query_pre_attn_scalar=256, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )


# benchmark-sized models: GPU only, never in the CPU test matrix
BENCH: dict[str, tuple[Callable[[], Any], str]] = {
    "bench-hybrid-0.6b": (_bench_hybrid_06b, "NemotronHForCausalLM"),
    "bench-swa-0.7b": (_bench_swa_07b, "Gemma3ForCausalLM"),
    "bench-gemma3-270m": (_bench_gemma3_270m, "Gemma3ForCausalLM"),
}


def zoo_names() -> list[str]:
    return list(ZOO)


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build zoo (or benchmark) model ``name`` with random weights from ``seed``, in eval mode."""
    entries = {**ZOO, **BENCH}
    if name not in entries:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(entries)}")
    import transformers

    from . import hybrid

    config_fn, class_name = entries[name]
    config = config_fn()
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(hybrid if hasattr(hybrid, class_name) else transformers, class_name)(config)
    return model.to(dtype).eval()
