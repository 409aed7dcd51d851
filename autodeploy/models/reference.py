"""Reference decoding with the unmodified model, for checking the engine."""

from __future__ import annotations

import torch


def _device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def greedy_uncached(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by repeated full (uncached) forwards of ``model`` on its own device:
    independent of any cache code path, ours or transformers'."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids], device=_device(model)), use_cache=False).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy_generate(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' own cached ``generate()``, greedy, exactly ``n`` tokens (no EOS stop)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=_device(model)), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
