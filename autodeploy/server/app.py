"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, metrics.

Each request is validated, tokenized (chat template for chat), handed to the engine loop and
answered from its token events: as one JSON body, or with ``"stream": true`` as server-sent events
in OpenAI's chunk format ending in ``data: [DONE]``. A client that goes away aborts its request,
which frees its slot and KV pages. Every refusal is OpenAI's error JSON with a 4xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autodeploy.server.engine_loop import EngineLoop
from autodeploy.server.protocol import ChatCompletionRequest, CompletionRequest, RequestError, _Request
from autodeploy.text import TextStream, chat_prompt_ids, text_prompt_ids

logger = logging.getLogger("autodeploy.server")


class _Generation:
    """One request in flight: its token events turned into (text delta, token ids, finish reason)."""

    def __init__(self, loop: EngineLoop, request_id: int, events: asyncio.Queue, text: TextStream,
                 prompt_ids: list[int]):
        self.loop, self.request_id, self.events, self.text, self.prompt_ids = loop, request_id, events, text, prompt_ids
        self.finish_reason: str | None = None

    async def deltas(self) -> AsyncIterator[tuple[str, list[int], str | None]]:
        try:
            while self.finish_reason is None:
                event = await self.events.get()
                if event.error:
                    raise RequestError(f"the engine failed: {event.error}", status=500, kind="server_error")
                before = len(self.text.token_ids)
                delta = self.text.push(event.token_ids)
                reason = "stop" if self.text.stopped else event.finish_reason
                if self.text.stopped and event.finish_reason is None:
                    self.loop.abort(self.request_id, "stop")  # a stop string: free the caches now
                if reason is not None:
                    delta += self.text.finish()
                    self.finish_reason = reason
                ids = self.text.token_ids[before:]
                if delta or ids or reason:
                    yield delta, ids, reason
        finally:
            if self.finish_reason is None:  # the client left (or the server stops): abort
                self.loop.abort(self.request_id)

    def usage(self) -> dict:
        n_prompt, n_out = len(self.prompt_ids), len(self.text.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def build_app(llm: Any, model_name: str, ready: Callable[[], None] | None = None) -> FastAPI:
    """The app serving ``llm`` as model ``model_name``; its engine loop runs while the app does
    (``ready`` is called once it runs)."""
    engine_loop = EngineLoop(llm)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        if ready is not None:
            ready()
        try:
            yield
        finally:
            engine_loop.stop()

    app = FastAPI(title="autodeploy", lifespan=lifespan)
    app.state.engine_loop = engine_loop
    created = int(time.time())
    max_len = llm.config.max_seq_len

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif err.get("type") == "extra_forbidden":
            message, param = f"Unrecognized request argument supplied: {'.'.join(loc)}", loc[-1] if loc else None
        else:
            message, param = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}", loc[0] if loc else None
        return JSONResponse(RequestError(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(RequestError(str(exc.detail), status=exc.status_code, kind=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("internal error")
        return JSONResponse(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                         kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        if not engine_loop.alive:
            return JSONResponse({"status": "error", "error": engine_loop.error or "the engine loop is not running"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine_loop.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "autodeploy", "max_model_len": max_len}]}

    async def start(body: _Request, prompt_ids: list[int], default_max_tokens: int | None) -> _Generation:
        """Check the request against the model, then queue it on the engine."""
        if len(prompt_ids) >= max_len:
            raise RequestError(f"This model's maximum context length is {max_len} tokens. However, your prompt "
                               f"has {len(prompt_ids)} tokens. Please reduce the length of the prompt.",
                               "messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                               code="context_length_exceeded")
        max_tokens = default_max_tokens or max_len - len(prompt_ids)
        if len(prompt_ids) + max_tokens > max_len:
            raise RequestError(f"This model's maximum context length is {max_len} tokens. However, you requested "
                               f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} "
                               "for the completion). Please reduce the prompt or max_tokens.", "max_tokens",
                               code="context_length_exceeded")
        try:
            params = body.sampling_params(max_tokens)
            text = TextStream(llm.tokenizer, params.stop)
        except ValueError as e:
            raise RequestError(str(e), "stop" if "stop" in str(e) else None) from e
        try:
            request_id, events = await engine_loop.submit(prompt_ids, params)
        except (ValueError, TypeError) as e:  # the engine's own checks (token ids outside the vocabulary, ...)
            raise RequestError(str(e), "prompt") from e
        except RuntimeError as e:
            raise RequestError(str(e), status=503, kind="server_error") from e
        return _Generation(engine_loop, request_id, events, text, prompt_ids)

    def check(body: _Request) -> None:
        if body.model != model_name:
            raise RequestError(f"The model `{body.model}` does not exist; this server serves `{model_name}` "
                               "(GET /v1/models)", "model", status=404, code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise RequestError(f"{bad[0]} is not supported by this server (supported: n=1, no logprobs, "
                               "no penalties, no logit_bias, no tools)", bad[0])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError("one prompt per request: send several requests (they are batched together)",
                                   "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            try:
                prompt_ids = text_prompt_ids(llm.tokenizer, prompt)
            except ValueError as e:
                raise RequestError(f"{e} (a list of ints as 'prompt')", "prompt") from e
        else:
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        gen = await start(body, prompt_ids, body.max_tokens or 16)

        def choice(text: str, ids: list[int], reason: str | None) -> dict:
            return _choice(body, {"text": text}, ids, reason)

        return await _reply(body, gen, raw, f"cmpl-{uuid.uuid4().hex}", model_name, ("text_completion",) * 2,
                            choice, choice)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check(body)
        messages = [m.as_template_input() for m in body.messages]
        try:
            prompt_ids = chat_prompt_ids(llm.tokenizer, messages)
        except ValueError as e:
            raise RequestError(str(e), "messages") from e
        gen = await start(body, prompt_ids, body.max_completion_tokens or body.max_tokens)

        def chunk(delta: str, ids: list[int], reason: str | None) -> dict:
            return _choice(body, {"delta": {"content": delta} if delta else {}}, ids, reason)

        def message(text: str, ids: list[int], reason: str | None) -> dict:
            return _choice(body, {"message": {"role": "assistant", "content": text}}, ids, reason)

        return await _reply(body, gen, raw, f"chatcmpl-{uuid.uuid4().hex}", model_name,
                            ("chat.completion.chunk", "chat.completion"), chunk, message,
                            opening=_choice(body, {"delta": {"role": "assistant", "content": ""}}, [], None))

    return app


def _choice(body: _Request, fields: dict, ids: list[int], reason: str | None) -> dict:
    """One choice of a response or chunk: ``fields`` (text, delta or message), with the token ids
    when the request asked for them."""
    out = {"index": 0, **fields, "logprobs": None, "finish_reason": reason}
    if body.return_token_ids:
        out["token_ids"] = ids
    return out


async def _reply(body: _Request, gen: _Generation, raw: Request, rid: str, model_name: str, objects: tuple[str, str],
                 streamed: Callable[[str, list[int], str | None], dict],
                 whole: Callable[[str, list[int], str | None], dict], opening: dict | None = None) -> Any:
    """The answer to a (chat) completion request: server-sent chunks (``objects[0]``; ``opening``
    first, then a ``streamed`` choice per delta, then the usage if asked for) with ``"stream": true``,
    else one ``objects[1]`` body holding the ``whole`` choice; 499 when the client left first."""
    def envelope(choices: list[dict], obj: str = objects[0], **extra: Any) -> dict:
        out = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices,
               **extra}
        if body.return_token_ids:
            out["prompt_token_ids"] = gen.prompt_ids
        return out

    if body.stream:
        async def events():
            if opening is not None:
                yield envelope([opening])
            async for delta, ids, reason in gen.deltas():
                if delta or reason or body.return_token_ids:  # (text held back: nothing to say yet)
                    yield envelope([streamed(delta, ids, reason)])
            if body.include_usage:
                yield envelope([], usage=gen.usage())
        return _sse(events())
    done = await _collect(gen, raw)
    if done is None:
        return Response(status_code=499)
    return envelope([whole(*done)], obj=objects[1], usage=gen.usage())


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events: one ``data: {json}`` per chunk, then ``data: [DONE]``; an engine failure
    after the stream began is sent as an error event."""
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except RequestError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _collect(gen: _Generation, raw: Request) -> tuple[str, list[int], str | None] | None:
    """The whole completion, or None when the client disconnected first (its request is aborted)."""
    async def whole():
        text, ids, reason = "", [], None
        async for delta, new, last in gen.deltas():
            text += delta
            ids += new
            reason = last
        return text, ids, reason

    async def disconnected():
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(whole()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(work, watch, return_exceptions=True)
    return work.result() if work.done() and not work.cancelled() else None
