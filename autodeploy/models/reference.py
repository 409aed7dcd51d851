"""Reference decoding with the unmodified model, for checking the engine."""

from __future__ import annotations

import torch


def greedy_uncached(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by repeated full (uncached) forwards of ``model``: independent of any cache
    code path, ours or transformers'."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]
