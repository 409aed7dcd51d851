"""Load: 64 concurrent streaming clients (16 hanging up mid-stream) on a 16-lane engine: every
finished request is complete and equal to its offline tokens, every aborted one is freed, the pools
end empty, and the server still answers exactly."""

import asyncio
import time

import httpx

from autodeploy.server.load import run_load, summarize
from conftest import ID_PROMPTS, NEW_TOKENS

CLIENTS = 64


def test_64_streaming_clients_some_disconnecting(live):
    server, offline = live
    bodies = [{"model": "hybrid", "prompt": ID_PROMPTS[i % len(ID_PROMPTS)], "max_tokens": NEW_TOKENS,
               "temperature": 0, "ignore_eos": True} for i in range(CLIENTS)]
    hang_up = [2 + i % 3 if i % 4 == 3 else None for i in range(CLIENTS)]  # 16 clients leave after 2-4 chunks
    results, seconds = asyncio.run(run_load(server.url, bodies, hang_up, timeout=60))
    assert all(r.status == 200 for r in results)
    for i, r in enumerate(results):
        want = offline["ids", i % len(ID_PROMPTS)].outputs[0]
        if hang_up[i] is None:
            assert r.token_ids == want.token_ids and r.finish_reason == "length" and r.text == want.text
        else:
            assert r.disconnected and want.token_ids[:len(r.token_ids)] == r.token_ids
    deadline = time.monotonic() + 10
    engine = server.loop.engine
    while engine.has_unfinished() or engine.requests:
        assert time.monotonic() < deadline, "aborted requests were not freed"
        time.sleep(0.02)
    engine.pools.assert_empty()
    summary = summarize(results, seconds)
    assert summary["finished"] == CLIENTS - 16 and summary["disconnected"] == 16
    r = httpx.post(server.url + "/v1/completions", json={**bodies[0], "return_token_ids": True}, timeout=30)
    assert r.json()["choices"][0]["token_ids"] == offline["ids", 0].outputs[0].token_ids
