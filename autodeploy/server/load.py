"""Concurrent streaming clients against a running server: the load test and the serving benchmark.

``run_load(url, bodies, disconnect_after)`` opens one streaming ``/v1/completions`` request per
body at once (httpx, one connection each); a client with ``disconnect_after=k`` closes its
connection after k chunks. Returns per-client records (tokens, finish reason, time to first token,
gaps between tokens) and ``summarize`` turns them into throughput and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClientResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    disconnected: bool = False
    status: int = 0
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk's tokens
    start: float = 0.0
    end: float = 0.0


async def stream_completion(client: Any, url: str, body: dict, disconnect_after: int | None = None) -> ClientResult:
    """One streaming completion; ``body`` gets ``stream`` and ``return_token_ids`` set."""
    result = ClientResult(start=time.perf_counter())
    chunks = 0
    async with client.stream("POST", url + "/v1/completions",
                             json={**body, "stream": True, "return_token_ids": True}) as response:
        result.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            result.text = response.text
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            now = time.perf_counter()
            if choice.get("token_ids"):
                if result.ttft is None:
                    result.ttft = now - result.start
                result.token_times += [now] * len(choice["token_ids"])
                result.token_ids += choice["token_ids"]
            result.text += choice["text"]
            result.finish_reason = choice["finish_reason"] or result.finish_reason
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after and result.finish_reason is None:
                result.disconnected = True
                break  # leaving the block closes the connection mid-stream
    result.end = time.perf_counter()
    return result


async def run_load(url: str, bodies: list[dict], disconnect_after: list[int | None] | None = None,
                   timeout: float = 120.0) -> tuple[list[ClientResult], float]:
    """All ``bodies`` streamed concurrently; returns the results (in order) and the wall time."""
    import httpx

    disconnect_after = disconnect_after or [None] * len(bodies)
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(client, url, b, d)
                                         for b, d in zip(bodies, disconnect_after)))
        return list(results), time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(results: list[ClientResult], seconds: float) -> dict[str, Any]:
    """Throughput (generated tokens / wall time) and time-to-first-token, inter-token latency and
    end-to-end percentiles (ms) over the clients that finished."""
    done = [r for r in results if r.finish_reason and not r.disconnected]
    tokens = sum(len(r.token_ids) for r in results)
    gaps = [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])]
    ms = lambda xs: {k: round(v * 1e3, 2) for k, v in _percentiles(xs).items()}  # noqa: E731
    return {"clients": len(results), "finished": len(done), "disconnected": sum(r.disconnected for r in results),
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "requests_per_s": round(len(done) / seconds, 2),
            "ttft_ms": ms([r.ttft for r in done if r.ttft is not None]), "itl_ms": ms(gaps),
            "e2e_ms": ms([r.end - r.start for r in done])}
