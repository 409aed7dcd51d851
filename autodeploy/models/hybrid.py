"""The embedded default: a tiny hybrid of Mamba2, sliding-window attention and full attention.

No transformers family mixes all three (NemotronH and Bamba have Mamba2 and full attention only),
so this is transformers' NemotronH with one addition: a ``"sliding_attention"`` block type whose
attention layer is NemotronH's own, masked by transformers' sliding-window causal mask and cached
in a ``DynamicCache`` sliding layer. Everything that computes (Mamba2 mixer, attention, masks,
cache, ``generate()``) is transformers' code, so it stays an oracle nobody here wrote; the glue
below only routes the new block type to it.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``;
the glue passes it under whichever name the installed transformers uses (``CACHE_ARG``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from autodeploy.hf_version import check_transformers_version

check_transformers_version()

from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    create_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import MoeModelOutputWithPast  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h as nemotron_h  # noqa: E402

SLIDING = "sliding_attention"
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class HybridConfig(NemotronHConfig):
    """NemotronH's config, whose ``layers_block_type`` may also name ``"sliding_attention"``
    layers (window ``sliding_window``)."""

    model_type = "autodeploy_hybrid"

    def validate_layer_type(self):
        if SLIDING in (self.layer_types or []):
            if not self.sliding_window or self.sliding_window < 1:
                raise ValueError("a 'sliding_attention' layer needs sliding_window >= 1")
            saved, self.layer_types = self.layer_types, [
                "full_attention" if t == SLIDING else t for t in self.layer_types
            ]
            try:
                NemotronHConfig.validate_layer_type(self)
            finally:
                self.layer_types = saved
        else:
            NemotronHConfig.validate_layer_type(self)


def _first_layer(config, block_type: str) -> int | None:
    types = list(config.layers_block_type)
    return types.index(block_type) if block_type in types else None


def _masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """Each attention kind's mask, sized by the first cache layer of that kind (transformers before
    5.24 sizes a full-attention mask by cache layer 0 unless told, here a Mamba layer)."""
    kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
              CACHE_ARG: cache, "position_ids": position_ids}
    return {
        "full_attention": create_causal_mask(**kwargs, layer_idx=_first_layer(config, "full_attention")),
        SLIDING: create_sliding_window_causal_mask(**kwargs, layer_idx=_first_layer(config, SLIDING)),
        "linear_attention": create_recurrent_attention_mask(**kwargs),
    }


class HybridBlock(nemotron_h.NemotronHBlock):
    """A NemotronH block; a sliding block runs NemotronH's attention under the sliding mask."""

    def __init__(self, config, layer_idx):
        is_sliding = config.layers_block_type[layer_idx] == SLIDING
        if is_sliding:
            if not config.sliding_window or config.sliding_window < 1:  # the config is not validated on init
                raise ValueError(f"layer {layer_idx} is 'sliding_attention' but sliding_window is "
                                 f"{config.sliding_window!r}; it must be >= 1")
            config.layers_block_type[layer_idx] = "full_attention"
        try:
            super().__init__(config, layer_idx)
        finally:
            if is_sliding:
                config.layers_block_type[layer_idx] = SLIDING
        self.mask_type = SLIDING if is_sliding else self.block_type
        if is_sliding:
            self.mixer.sliding_window = config.sliding_window


class HybridModel(nemotron_h.NemotronHModel):
    def __init__(self, config: HybridConfig):
        nemotron_h.NemotronHPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([HybridBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = nemotron_h.NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, use_cache=None,
                attention_mask=None, **kwargs):
        cache = kwargs.pop(CACHE_ARG, None)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and cache is None:
            cache = nemotron_h.DynamicCache(config=self.config)
        hidden_states = inputs_embeds
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden_states.shape[1], device=hidden_states.device) + past).unsqueeze(0)
        masks = attention_mask
        if not isinstance(masks, dict):
            masks = _masks(self.config, inputs_embeds, attention_mask, cache, position_ids)
        for block in self.layers:
            hidden_states = block(hidden_states, attention_mask=masks.get(block.mask_type),
                                  position_ids=position_ids, use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.norm_f(hidden_states),
                                      **{CACHE_ARG: cache if use_cache else None})


class HybridForCausalLM(NemotronHForCausalLM):
    config_class = HybridConfig

    def __init__(self, config: HybridConfig):
        nemotron_h.NemotronHPreTrainedModel.__init__(self, config)
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, position_ids=None, **kwargs):
        return _masks(config.get_text_config(), inputs_embeds, attention_mask, kwargs.get(CACHE_ARG), position_ids)
