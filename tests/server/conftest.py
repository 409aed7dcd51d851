"""A live server on 127.0.0.1 for the server tests: the embedded hybrid model with the zoo's
byte-level tokenizer, and the offline LLM outputs it must reproduce (computed on the same engine
before the server takes it over)."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from autodeploy import LLM, SamplingParams  # noqa: E402
from autodeploy.models import build_model  # noqa: E402
from autodeploy.models.tokenizer import byte_tokenizer  # noqa: E402

SERVER_CONFIG = {"max_batch_size": 16, "max_seq_len": 96, "max_num_tokens": 64, "page_size": 16}
ID_PROMPTS = [[5, 17, 99, 3], list(range(40, 80)), [200]]
TEXT_PROMPTS = ["Hello, world", "The quick brown fox"]
CHATS = [[{"role": "user", "content": "hi"}],
         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]]
NEW_TOKENS = 12


def served_llm() -> LLM:
    model = build_model("hybrid")
    return LLM(model, tokenizer=byte_tokenizer(model.config), **SERVER_CONFIG)


@pytest.fixture(scope="package")
def live():
    """(server, offline): ``offline`` maps ("ids"|"text"|"chat", i) -> the offline RequestOutput,
    greedy, ignore_eos, NEW_TOKENS tokens."""
    from autodeploy.server import LiveServer

    llm = served_llm()
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    offline = {}
    for i, out in enumerate(llm.generate([{"prompt_token_ids": p} for p in ID_PROMPTS], params)):
        offline["ids", i] = out
    for i, out in enumerate(llm.generate(TEXT_PROMPTS, params)):
        offline["text", i] = out
    for i, out in enumerate(llm.chat(CHATS, params)):
        offline["chat", i] = out
    with LiveServer(llm, "hybrid") as server:
        yield server, offline
