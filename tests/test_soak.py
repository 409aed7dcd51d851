"""Soak: thousands of short requests through one engine; memory and pools stay flat."""

import gc
import os
import tracemalloc

import torch

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model

REQUESTS = int(os.environ.get("AUTODEPLOY_SOAK", "800"))  # a few minutes: AUTODEPLOY_SOAK=5000


def test_thousands_of_requests_leak_nothing():
    llm = LLM(build_model("hybrid"), max_batch_size=8, max_seq_len=32, max_num_tokens=32, page_size=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=3, ignore_eos=True)

    def serve(n):
        for _ in range(n // 50):
            ps = [{"prompt_token_ids": torch.randint(0, 256, (int(k),), generator=g).tolist()}
                  for k in torch.randint(1, 6, (50,), generator=g)]
            outs = llm.generate(ps, params)
            assert all(len(o.outputs[0].token_ids) == 3 for o in outs)

    serve(REQUESTS // 4)  # warm-up: caches, allocator pools, lazy imports
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    objects = len(gc.get_objects())
    serve(REQUESTS * 3 // 4)
    gc.collect()
    grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert not llm.engine.requests and not llm.engine.has_unfinished()
    llm.engine.pools.assert_empty()
    assert len(gc.get_objects()) - objects < 2000, "Python objects grow with the number of requests"
    assert grown < 2 << 20, f"traced memory grew by {grown} bytes over {REQUESTS * 3 // 4} requests"
