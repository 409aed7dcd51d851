"""Request bookkeeping the decode loop relies on without building the whole token list."""

from autodeploy.runtime.engine import Request
from autodeploy.runtime.sampling import SamplingParams


def test_new_tokens_and_num_tokens_match_the_token_list():
    req = Request(0, [10, 11, 12, 13], SamplingParams(max_tokens=8), output=[20, 21, 22])
    assert req.num_tokens == len(req.tokens) == 7
    for cached in range(req.num_tokens + 1):
        req.num_cached = cached
        for n in range(req.num_tokens - cached + 2):  # one past the end too: slicing semantics
            assert req.new_tokens(n) == req.tokens[cached:cached + n], (cached, n)
