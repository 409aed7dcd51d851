"""OpenAI request bodies (pydantic), the parameters served, and OpenAI's error JSON.

Unknown fields are refused (as OpenAI does: "Unrecognized request argument"); known parameters this
server does not implement (n > 1, logprobs, echo, penalties, logit_bias, tools, ...) are refused by
name rather than ignored. vLLM's extensions ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``return_token_ids`` are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from autodeploy.runtime.sampling import SamplingParams


class RequestError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    def unsupported(self) -> list[str]:
        """Parameters given with a value this server does not implement."""
        out = [name for name, ok in (("n", self.n == 1), ("presence_penalty", self.presence_penalty == 0),
                                     ("frequency_penalty", self.frequency_penalty == 0),
                                     ("logit_bias", not self.logit_bias)) if not ok]
        if self.stream_options and set(self.stream_options) - {"include_usage"}:
            out.append("stream_options")
        return out

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise RequestError("stop strings must not be empty", "stop")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            seed=self.seed, max_tokens=max_tokens, stop=stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt, text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        return super().unsupported() + [
            name for name, ok in (("logprobs", self.logprobs is None), ("echo", not self.echo),
                                  ("best_of", self.best_of in (None, 1)), ("suffix", self.suffix is None)) if not ok]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        """{"role", "content": str}: text parts joined; other parts (images, audio) refused."""
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise RequestError("only text content parts are supported", "messages")
            content = "".join(part["text"] for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[str]:
        rf = self.response_format
        return super().unsupported() + [
            name for name, ok in (("logprobs", not self.logprobs), ("top_logprobs", self.top_logprobs is None),
                                  ("tools", not self.tools), ("tool_choice", self.tool_choice in (None, "none")),
                                  ("response_format", rf is None or rf.get("type") == "text")) if not ok]
