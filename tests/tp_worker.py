"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), launched by
``torchrun --nproc-per-node 2 tests/tp_worker.py OUT.json [--device cuda] [--compile-modes M,..] MODEL...``.

Every rank builds each zoo model (same seed), serves the same prompts greedily and sampled, and
rank 0 writes what every rank saw per "MODEL/MODE": tokens, cache bytes per pool, all-reduces.
"""

import argparse
import json

import torch

from autodeploy import LLM, SamplingParams, distributed
from autodeploy.models import build_model

PROMPT_LENS = (3, 40, 17)  # 40 > the sliding windows (gemma3 16, hybrid 24) and > one 32-token chunk
NEW_TOKENS = 12
ENGINE = {"max_batch_size": 4, "max_seq_len": 128, "max_num_tokens": 32}


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]


def main(out_path: str, names: list[str], device: str = "cpu", modes: tuple[str, ...] = ("eager",),
         prefix_caching: bool = False) -> None:
    torch.set_num_threads(1)
    report = {}
    for name, mode in [(n, m) for n in names for m in modes]:
        # tensor_parallel_size: torchrun's WORLD_SIZE
        caching = dict(enable_prefix_caching=True, prefix_snapshot_interval=16) if prefix_caching else {}
        llm = LLM(build_model(name), device=device, compile_mode=mode, **ENGINE, **caching)
        requests = [{"prompt_token_ids": p} for p in prompts()]
        greedy = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        sampled = llm.generate(requests, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0))
        shard = next(i for i in llm.transform_infos if i.name == "shard_tensor_parallel")
        mine = {
            "greedy": [o.outputs[0].token_ids for o in greedy],
            "sampled": [o.outputs[0].token_ids for o in sampled],
            "cache_bytes": llm.cache_bytes(),
            "all_reduces": shard.details.get("all_reduces", 0),
            "tensor_parallel_size": llm.config.tensor_parallel_size,
        }
        if prefix_caching:  # a second chat turn: each prompt + its answer + one token
            turn = [{"prompt_token_ids": p + o + [7]} for p, o in zip(prompts(), mine["greedy"])]
            outs = llm.generate(turn, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            mine["next_turn"] = [o.outputs[0].token_ids for o in outs]
            mine["next_turn_cached"] = [o.num_cached_tokens for o in outs]
        report[f"{name}/{mode}"] = distributed.all_gather_object(mine)
    if distributed.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile-modes", default="eager")
    parser.add_argument("--prefix-caching", action="store_true")
    args = parser.parse_args()
    main(args.out, args.models, args.device, tuple(args.compile_modes.split(",")), args.prefix_caching)
