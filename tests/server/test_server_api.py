"""The OpenAI-compatible server, live on 127.0.0.1, through the official openai client and plain
HTTP: tokens equal offline LLM.generate / LLM.chat (float32, greedy), streaming equals
non-streaming, OpenAI's error JSON for bad requests, a disconnect frees the request's caches."""

import json
import time

import httpx
import pytest

from conftest import CHATS, ID_PROMPTS, NEW_TOKENS, TEXT_PROMPTS

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True, "return_token_ids": True}}


@pytest.fixture(scope="module")
def client(live):
    server, _ = live
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _idle(server, timeout=10.0):
    """Wait until the engine has nothing left, then its pools must be empty."""
    deadline = time.monotonic() + timeout
    while server.loop.engine.has_unfinished() or server.loop.engine.requests:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.02)
    server.loop.engine.pools.assert_empty()


def test_completions_equal_offline_generate(live, client):
    server, offline = live
    for i, prompt in enumerate(ID_PROMPTS):
        out = client.completions.create(model="hybrid", prompt=prompt, **GREEDY)
        choice, want = out.choices[0], offline["ids", i].outputs[0]
        assert choice.token_ids == want.token_ids and choice.text == want.text
        assert choice.finish_reason == "length"
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == NEW_TOKENS
    for i, prompt in enumerate(TEXT_PROMPTS):
        out = client.completions.create(model="hybrid", prompt=prompt, **GREEDY)
        assert out.choices[0].token_ids == offline["text", i].outputs[0].token_ids
        assert out.choices[0].text == offline["text", i].outputs[0].text
    _idle(server)


def test_chat_equals_offline_chat(live, client):
    server, offline = live
    for i, messages in enumerate(CHATS):
        out = client.chat.completions.create(model="hybrid", messages=messages, **GREEDY)
        want = offline["chat", i]
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == want.outputs[0].text
        assert out.choices[0].token_ids == want.outputs[0].token_ids
        assert out.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streaming_equals_offline(live, client):
    server, offline = live
    chunks = list(client.completions.create(model="hybrid", prompt=ID_PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    want = offline["ids", 1].outputs[0]
    assert sum((c.choices[0].token_ids for c in chunks if c.choices), []) == want.token_ids
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == NEW_TOKENS and not chunks[-1].choices
    stream = client.chat.completions.create(model="hybrid", messages=CHATS[1], stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline["chat", 1].outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_never_stream_past_the_stop(live, client):
    server, offline = live
    want = offline["text", 0].outputs[0].text
    stop = next(want[i:i + 2] for i in range(2, len(want) - 1) if "\ufffd" not in want[i:i + 2])
    expected = want[:want.find(stop)]
    stopped = _finished(server, "stop")
    full = client.completions.create(model="hybrid", prompt=TEXT_PROMPTS[0], stop=[stop], **GREEDY)
    assert full.choices[0].text == expected and full.choices[0].finish_reason == "stop"
    streamed, seen = "", []
    for chunk in client.completions.create(model="hybrid", prompt=TEXT_PROMPTS[0], stop=stop, stream=True, **GREEDY):
        streamed += chunk.choices[0].text
        seen.append(streamed)
        assert stop not in streamed and expected.startswith(streamed)
    assert streamed == expected
    _idle(server)  # the request was aborted at the stop string: its caches are free
    assert _finished(server, "stop") == stopped + 2  # ended by the stop string, not run on to max_tokens


def test_sampling_with_seed_is_reproducible(live, client):
    kwargs = {"model": "hybrid", "prompt": ID_PROMPTS[0], "max_tokens": 8, "temperature": 0.9, "top_p": 0.9,
              "seed": 7, "extra_body": {"top_k": 50, "return_token_ids": True, "ignore_eos": True}}
    first = client.completions.create(**kwargs).choices[0].token_ids
    assert client.completions.create(**kwargs).choices[0].token_ids == first and len(first) == 8


def _post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "nope", "prompt": [1, 2]}, 404, "model"),
    ({"model": "hybrid", "prompt": [1, 2], "max_tokens": -3}, 400, "max_tokens"),
    ({"model": "hybrid", "prompt": list(range(1, 97))}, 400, "prompt"),  # 96 tokens: the whole context
    ({"model": "hybrid", "prompt": [1, 2], "max_tokens": 95}, 400, "max_tokens"),
    ({"model": "hybrid", "prompt": [1, 2], "n": 2}, 400, "n"),
    ({"model": "hybrid", "prompt": [1, 2], "logprobs": 1}, 400, "logprobs"),
    ({"model": "hybrid", "prompt": [1, 2], "frobnicate": True}, 400, "frobnicate"),
    ({"model": "hybrid", "prompt": [1, 999]}, 400, "prompt"),  # outside the vocabulary
    ({"model": "hybrid", "prompt": []}, 400, "prompt"),
    ({"model": "hybrid", "prompt": [1], "temperature": -1}, 400, "temperature"),
    ({"prompt": [1, 2]}, 400, "model"),
])
def test_bad_completion_requests_are_openai_errors(live, body, status, param):
    server, offline = live
    r = _post(server, "/v1/completions", body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_bad_chat_requests_and_the_server_keeps_serving(live, client):
    server, offline = live
    for body, param in [({"model": "hybrid", "messages": []}, "messages"),
                        ({"model": "hybrid", "messages": [{"role": "robot", "content": "x"}]}, "messages"),
                        ({"model": "hybrid", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
                        ({"model": "hybrid", "messages": [{"role": "user", "content": "x" * 200}]}, "messages")]:
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="hybrid", prompt=[1] * 200, max_tokens=1)
    out = client.completions.create(model="hybrid", prompt=ID_PROMPTS[2], **GREEDY)  # exact tokens after errors
    assert out.choices[0].token_ids == offline["ids", 2].outputs[0].token_ids
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_models_health_metrics(live, client):
    server, _ = live
    assert [m.id for m in client.models.list().data] == ["hybrid"]
    client.completions.create(model="hybrid", prompt=[1, 2, 3], **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["autodeploy_generation_tokens_total"] >= NEW_TOKENS
    assert values["autodeploy_time_to_first_token_seconds_count"] >= 1
    assert values["autodeploy_time_per_output_token_seconds_count"] >= NEW_TOKENS - 1
    assert values['autodeploy_requests_finished_total{finish_reason="length"}'] >= 1
    assert values["autodeploy_num_requests_running"] == 0 and values["autodeploy_kv_pages_used"] == 0
    assert values["autodeploy_kv_pages_total"] == server.loop.engine.pools.pages.capacity
    assert values["autodeploy_engine_healthy"] == 1


def test_disconnect_aborts_and_frees(live):
    server, offline = live
    aborted, generated = _finished(server, "abort"), _metric(server, "autodeploy_generation_tokens_total")
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": "hybrid", "prompt": [7, 8, 9], "max_tokens": 80, "ignore_eos": True,
                               "stream": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # the first chunk came: the request runs; now hang up
    _idle(server)
    assert _finished(server, "abort") == aborted + 1
    assert _metric(server, "autodeploy_generation_tokens_total") - generated < 80  # stopped, not run to the end
    # non-streaming: a client that times out (and so disconnects) aborts too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"model": "hybrid", "prompt": [7, 8], "max_tokens": 80,
                                                         "ignore_eos": True}, timeout=0.3)
    _idle(server)
    assert _finished(server, "abort") == aborted + 2
    assert _metric(server, "autodeploy_generation_tokens_total") - generated < 160


def _metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _finished(server, reason) -> float:
    """Requests finished with ``reason`` so far, as /metrics counts them."""
    return _metric(server, f'autodeploy_requests_finished_total{{finish_reason="{reason}"}}')


def test_model_without_tokenizer_takes_ids_and_counts_speculation():
    """A model with no tokenizer: token ids in and out, text requests refused with a message saying
    what to send; with ngram speculation /metrics counts drafts and tokens stay the greedy ones."""
    from autodeploy import LLM, SamplingParams
    from autodeploy.models import build_model
    from autodeploy.server import LiveServer

    llm = LLM(build_model("llama"), max_batch_size=4, max_seq_len=64, max_num_tokens=32, page_size=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    prompt = [5, 6, 7, 8] * 6
    plain = LLM(build_model("llama"), max_batch_size=4, max_seq_len=64, max_num_tokens=32, page_size=8)
    want = plain.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=20, ignore_eos=True))
    with LiveServer(llm, "llama") as server:
        r = _post(server, "/v1/completions", {"model": "llama", "prompt": prompt, "max_tokens": 20, "temperature": 0,
                                              "ignore_eos": True, "return_token_ids": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
        assert r.json()["choices"][0]["token_ids"] == want[0].outputs[0].token_ids
        assert _metric(server, "autodeploy_spec_decode_draft_tokens_total") > 0
        for path, body, param in [
                ("/v1/completions", {"model": "llama", "prompt": "hello"}, "prompt"),
                ("/v1/completions", {"model": "llama", "prompt": [1, 2], "stop": "x"}, "stop"),
                ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "hi"}]},
                 "messages")]:
            r = _post(server, path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "tokenizer" in r.json()["error"]["message"]

        def broken(*args, **kwargs):  # a device error in the middle of a step
            raise RuntimeError("device lost")

        llm.engine.runner.run = broken
        r = _post(server, "/v1/completions", {"model": "llama", "prompt": [1, 2], "max_tokens": 4})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "device lost" in health.json()["error"]
        r = _post(server, "/v1/completions", {"model": "llama", "prompt": [1, 2], "max_tokens": 4})
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
