"""The embedded hybrid model (Mamba2 + sliding-window + full attention on NemotronH blocks)."""

import pytest
import torch

from autodeploy.models import build_model
from autodeploy.models.hybrid import HybridConfig, HybridForCausalLM
from helpers import hf_generate, hf_greedy_uncached, hf_logits


def test_the_sliding_layer_really_slides():
    """Logits inside the window match the same weights with the window removed; past it they do not."""
    model = build_model("hybrid")
    window = model.config.sliding_window
    full = build_model("hybrid")
    full.config.layers_block_type = ["full_attention" if t == "sliding_attention" else t
                                     for t in full.config.layers_block_type]
    for block in full.model.layers:
        block.mask_type = "full_attention" if block.mask_type == "sliding_attention" else block.mask_type
        if hasattr(block.mixer, "sliding_window"):
            block.mixer.sliding_window = None
    ids, pos, ref = hf_logits(model, 2 * window)
    with torch.no_grad():
        unwindowed = full(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(ref[:, :window], unwindowed[:, :window], atol=1e-5, rtol=0)
    assert (ref[:, window:] - unwindowed[:, window:]).abs().max() > 1e-3


def test_generate_matches_uncached_forward():
    """transformers' own cached generate() on the hybrid agrees with its uncached forwards
    (for prompts away from the lengths where its cached Mamba path departs, see test_api)."""
    model = build_model("hybrid")
    g = torch.Generator().manual_seed(5)
    for n in (3, 40):
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        assert hf_generate(model, prompt, 12) == hf_greedy_uncached(model, prompt, 12)


def test_sliding_layer_needs_a_window():
    config = HybridConfig(layers_block_type=["sliding_attention", "mlp"], sliding_window=None, vocab_size=16,
                          hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="sliding_window >= 1"):
        config.validate_layer_type()
    with pytest.raises(ValueError, match="layer 0 is 'sliding_attention' but sliding_window is None"):
        HybridForCausalLM(config)
