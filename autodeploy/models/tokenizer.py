"""A byte-level tokenizer for the zoo models (256-token vocabularies), built in code, no download.

Ids name the model config's special tokens (pad, bos, eos) and every byte except the three
lowest control bytes (NUL, SOH, STX: dropped from input text, they never occur in prose), so any
text round-trips and the zoo models serve text: ``autodeploy serve`` with no MODEL takes and
returns strings, and chat requests go through a small ChatML-like template. The weights are
random, so the text they generate is random bytes too.
"""

from __future__ import annotations

from typing import Any

SPECIALS = ("pad", "bos", "eos")
DROPPED_BYTES = 3  # bytes 0x00-0x02 give their ids to the special tokens

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer(config: Any) -> Any:
    """A ``PreTrainedTokenizerFast`` whose ids fit ``config.vocab_size`` (256): the config's pad, bos
    and eos ids (each in 0..2) are special tokens, the other ids are bytes 0x03..0xFF in order.
    Saved with ``save_pretrained`` it loads back with ``AutoTokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if getattr(config, "vocab_size", None) != 256:
        raise ValueError(f"the byte tokenizer needs a 256-token vocabulary, the model has {config.vocab_size}")
    ids = {role: getattr(config, f"{role}_token_id", None) for role in SPECIALS}
    present = [i for i in ids.values() if i is not None]
    if len(set(present)) != len(present) or not all(isinstance(i, int) and 0 <= i < DROPPED_BYTES for i in present):
        raise ValueError(f"the byte tokenizer needs distinct special ids in 0..{DROPPED_BYTES - 1}, got {ids}")
    names = {i: f"<|{role}|>" for role, i in ids.items() if i is not None}
    names.update({i: f"<|unused{i}|>" for i in range(DROPPED_BYTES) if i not in names})
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))[DROPPED_BYTES:]
    vocab = {**{name: i for i, name in names.items()}, **{c: DROPPED_BYTES + k for k, c in enumerate(byte_chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Replace(Regex("[\x00-\x02]"), "")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(names.values()))
    kwargs = {f"{role}_token": f"<|{role}|>" for role, i in ids.items() if i is not None}
    if ids["bos"] is not None:  # a text prompt starts with BOS, as Llama's tokenizers do
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                           special_tokens=[("<|bos|>", ids["bos"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **kwargs)


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
