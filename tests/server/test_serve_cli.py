"""`autodeploy serve` as a user runs it: a subprocess on 127.0.0.1 that logs its URL and engine
configuration, answers the openai client, and on SIGTERM / SIGINT lets an in-flight stream finish
before it exits; bad options are one-line errors."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from autodeploy.cli import main


def _start(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # started as from a terminal: a test run launched in the background inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler for uvicorn to hand the signal back to
    proc = subprocess.Popen([sys.executable, "-m", "autodeploy", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if line.startswith("autodeploy serve: "):
            return proc, line.split()[2].removesuffix("/v1"), line
        assert time.monotonic() < deadline and proc.poll() is None, line
    raise AssertionError(f"server exited: {proc.wait()}")


def _stream_in_background(url, results):
    def go():
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "hybrid", "prompt": "Hi", "max_tokens": 20, "ignore_eos": True,
                                "stream": True, "temperature": 0, "return_token_ids": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    results.append(json.loads(line[6:])["choices"][0])
    thread = threading.Thread(target=go)
    thread.start()
    return thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_shuts_down_gracefully(sig):
    openai = pytest.importorskip("openai")
    proc, url, banner = _start("--max-seq-len", "64", "--max-batch-size", "4")
    try:
        assert "model 'hybrid' (HybridForCausalLM, with tokenizer)" in banner and "max_batch_size 4" in banner
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model="hybrid", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 3
        results = []
        thread = _stream_in_background(url, results)
        while not results:  # the stream is under way
            time.sleep(0.01)
        proc.send_signal(sig)
        thread.join(60)
        # the in-flight request finished, complete, before the server went away
        assert sum(len(c["token_ids"]) for c in results) == 20 and results[-1]["finish_reason"] == "length"
        assert proc.wait(60) == (130 if sig == signal.SIGINT else -signal.SIGTERM)  # the usual exit status of each
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_serve_bad_options_are_one_line_errors(capsys):
    assert main(["serve", "--tp", "2"]) == 3
    assert "serve --tp is not supported" in capsys.readouterr().err
    assert main(["serve", "no_such_model"]) == 3
    assert "neither a zoo model" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 3
    assert "--port" in capsys.readouterr().err
