"""The one place the server touches the engine: a thread that owns it.

Every engine call (``add_request``, ``abort``, ``step``) happens on this thread, so the engine needs
no locks and the asyncio event loop never waits for a step. Connections hand requests in through
a thread-safe queue; each request's new tokens go back to its own ``asyncio.Queue`` on the event
loop. The engine batches whatever is running (continuous batching), and requests it cannot place
yet wait in its queue. Only the engine's public surface is used: ``add_request``, ``abort``,
``step``, ``requests``, ``has_unfinished``, a request's growing ``output`` and ``finish_reason``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from autodeploy.runtime.sampling import SamplingParams
from autodeploy.server.metrics import ServerMetrics

logger = logging.getLogger("autodeploy.server")


@dataclass
class TokenEvent:
    """New tokens of a request; ``finish_reason`` set on its last event. ``error``: the engine failed."""

    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Tracked:
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    sent: int = 0
    last_token_time: float | None = None
    abort_reason: str | None = None
    prompt_len: int = 0
    extra: dict = field(default_factory=dict)


class EngineLoop:
    """Runs ``llm.engine`` on a dedicated thread; ``submit`` and ``abort`` are called from the event loop."""

    def __init__(self, llm: Any, metrics: ServerMetrics | None = None):
        self.llm, self.engine = llm, llm.engine
        self.metrics = metrics or ServerMetrics(self)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[int, _Tracked] = {}
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # set when the engine failed: the server is then unhealthy

    # -- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="autodeploy-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread and wait for it."""
        if self._thread is not None:
            self._inbox.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request; returns its id and the queue its TokenEvents arrive on. Raises the
        engine's ValueError (prompt too long for the context, bad token ids) before anything runs."""
        if not self.alive:
            raise RuntimeError(f"the engine is not running{': ' + self.error if self.error else ''}")
        done: concurrent.futures.Future = concurrent.futures.Future()
        tracked = _Tracked(asyncio.Queue(), asyncio.get_running_loop(), time.perf_counter(), prompt_len=len(prompt_ids))
        self._inbox.put(("add", prompt_ids, params, tracked, done))
        return await asyncio.wrap_future(done), tracked.events

    def abort(self, request_id: int, reason: str = "abort") -> None:
        """Stop a request (client gone, stop string reached): its slot and pages are freed."""
        self._inbox.put(("abort", request_id, reason))

    # -- engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if not self._handle_inbox(block=idle):
                    break
                if self.engine.has_unfinished():
                    self.engine.step()
                    self._publish()
        except Exception as e:  # a broken engine: tell every waiting client, refuse new requests
            logger.exception("engine loop failed")
            self.error = f"{type(e).__name__}: {e}"
            for tracked in list(self._tracked.values()):
                self._send(tracked, TokenEvent([], "error", self.error))
            self._tracked.clear()
            self._drain_after_failure()
        finally:
            for rid in list(self._tracked):
                self._abort(rid, "abort")

    def _handle_inbox(self, block: bool) -> bool:
        """Take every queued command (waiting for one when the engine is idle); False on stop."""
        while True:
            try:
                msg = self._inbox.get(timeout=None) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if msg[0] == "stop":
                return False
            if msg[0] == "add":
                _, prompt, params, tracked, done = msg
                try:
                    rid = self.engine.add_request(prompt, params)
                except Exception as e:  # bad input: the engine rejected it before touching any state
                    done.set_exception(e)
                    continue
                self._tracked[rid] = tracked
                self.metrics.on_arrival(len(prompt))
                done.set_result(rid)
            elif msg[0] == "abort":
                self._abort(msg[1], msg[2])

    def _abort(self, rid: int, reason: str) -> None:
        tracked = self._tracked.get(rid)
        if tracked is None:  # finished (and reported) already
            return
        tracked.abort_reason = reason
        self.engine.abort(rid)
        self._publish()

    def _publish(self) -> None:
        """Hand every request's new tokens to its queue; forget the finished ones."""
        now = time.perf_counter()
        for rid, tracked in list(self._tracked.items()):
            req = self.engine.requests[rid]
            new = req.output[tracked.sent:]
            if not new and not req.finished:
                continue
            if new:
                self.metrics.on_tokens(tracked, len(new), now)
                tracked.sent += len(new)
            reason = req.finish_reason
            if req.finished:
                if reason == "abort" and tracked.abort_reason:  # why we aborted it (a stop string: "stop")
                    reason = tracked.abort_reason
                del self._tracked[rid]
                self.engine.requests.pop(rid)
                self.metrics.on_finish(tracked, req, reason, now)
            self._send(tracked, TokenEvent(list(new), reason))

    @staticmethod
    def _send(tracked: _Tracked, event: TokenEvent) -> None:
        try:
            tracked.loop.call_soon_threadsafe(tracked.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass

    def _drain_after_failure(self) -> None:
        """After a failure, answer queued submissions with the error until told to stop."""
        while True:
            msg = self._inbox.get()
            if msg[0] == "stop":
                return
            if msg[0] == "add":
                msg[4].set_exception(RuntimeError(f"the engine failed: {self.error}"))
