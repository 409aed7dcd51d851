"""Text in, text out: TextStream (incremental decoding, stop strings held back), LLM.generate /
stream / chat with a checkpoint directory that has a tokenizer and a chat template, and the errors
for a model without one."""

import pytest

from autodeploy import LLM, SamplingParams
from autodeploy.models import build_model
from autodeploy.models.tokenizer import byte_tokenizer
from autodeploy.text import TextStream

PARAMS = {"max_batch_size": 4, "max_seq_len": 96, "max_num_tokens": 32, "page_size": 8}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer(build_model("llama").config)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_byte_tokenizer_round_trips_and_fits_the_vocabulary(tokenizer):
    text = "Grüße, 世界! 🙂 tabs\tand\nnewlines"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and max(ids) < 256
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "<|assistant|>" in tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                            add_generation_prompt=True)
    with pytest.raises(ValueError, match="256-token vocabulary"):
        byte_tokenizer(type("Config", (), {"vocab_size": 1000})())


def test_text_stream_holds_back_incomplete_characters(tokenizer):
    ids = _ids(tokenizer, "a€b")  # € is 3 bytes: 3 tokens
    stream, released = TextStream(tokenizer), []
    for t in ids:
        released.append(stream.push([t]))
    assert released == ["a", "", "", "€", "b"] and stream.finish() == ""
    cut = TextStream(tokenizer)
    assert cut.push(ids[:2]) == "a" and cut.finish() == "\ufffd"  # the end: what there is, as decoded


@pytest.mark.parametrize("stops, text, expected", [
    (["xy"], "abxycd", "ab"),
    (["b", "xyz"], "axyzb", "a"),          # the earliest stop wins
    (["zzz"], "abzzc", "abzzc"),           # a partial match that breaks off is released
    (["\n\n"], "line\n\nmore", "line"),
])
def test_text_stream_cuts_at_stop_and_never_streams_past_it(tokenizer, stops, text, expected):
    stream, streamed = TextStream(tokenizer, stops), ""
    for t in _ids(tokenizer, text):
        streamed += stream.push([t])
        assert not any(s in streamed for s in stops)
        assert expected.startswith(streamed)
        if stream.stopped:
            break
    streamed += stream.finish()
    assert streamed == expected == stream.text
    assert stream.stopped == (expected != text)
    if stream.stopped:  # tokens up to the one that completed the stop string
        assert tokenizer.decode(stream.token_ids).endswith(next(s for s in stops if text.find(s) == len(expected)))


def test_text_stream_needs_a_tokenizer_for_stop_strings():
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        TextStream(None, ["x"])
    assert TextStream(None).push([1, 2]) == ""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("llama_text")
    build_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint, **PARAMS)


def test_text_prompts_and_decoded_outputs(llm, tokenizer):
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    outs = llm.generate(["Hello", {"prompt": "Hi there"}, {"prompt_token_ids": [1, 72, 105]}], params)
    assert outs[0].prompt_token_ids == tokenizer("Hello")["input_ids"]
    assert outs[1].prompt_token_ids == tokenizer("Hi there")["input_ids"]
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 16 and c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # stream: text grows by appending, and ends as generate's
    texts = [o.outputs[0].text for o in llm.stream(["Hello"], params)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == outs[0].outputs[0].text
    llm.engine.pools.assert_empty()


def test_stop_strings_in_generate_and_stream(llm):
    full = llm.generate(["Hello"], SamplingParams(max_tokens=24, ignore_eos=True))[0].outputs[0]
    i = next(i for i in range(3, len(full.text) - 1) if "\ufffd" not in full.text[i:i + 2])
    stop = full.text[i:i + 2]
    expected = full.text[:full.text.find(stop)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=[stop, "never appears"])
    out = llm.generate(["Hello"], params)[0].outputs[0]
    assert out.text == expected and out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < 24
    snapshots = list(llm.stream(["Hello"], params))
    assert all(stop not in s.outputs[0].text for s in snapshots) and snapshots[-1].outputs[0].text == expected
    llm.engine.pools.assert_empty()  # stopped by a string: aborted, caches freed


def test_chat_applies_the_template(llm, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    out = llm.chat(messages, params)[0]
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids[0] == tokenizer.bos_token_id and templated.endswith("<|assistant|>\n")
    assert out.outputs[0].token_ids == llm.generate([{"prompt_token_ids": out.prompt_token_ids}],
                                                    params)[0].outputs[0].token_ids
    two = llm.chat([messages, messages[1:]], params)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids
    with pytest.raises(ValueError, match="chat template rejected"):
        llm.chat([{"role": "robot", "content": "x"}])


def test_chat_without_template_says_what_to_do(checkpoint):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(checkpoint)
    plain.chat_template = None
    llm = LLM(build_model("llama"), tokenizer=plain, **PARAMS)
    with pytest.raises(ValueError, match="no chat template: pass chat_template="):
        llm.chat([{"role": "user", "content": "hi"}])
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert out[0].prompt_token_ids == plain("hi", add_special_tokens=False)["input_ids"]
