"""``autodeploy serve``: an OpenAI-compatible HTTP server on the engine (FastAPI on uvicorn).

    from autodeploy.server import serve
    serve(LLM(build_model("hybrid"), tokenizer=...), "hybrid", port=8000)   # blocks; Ctrl-C stops it

    with LiveServer(llm, "hybrid") as server:     # in a background thread, on a free port
        httpx.get(server.url + "/v1/models")
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

from autodeploy.server.app import build_app
from autodeploy.server.engine_loop import EngineLoop

__all__ = ["LiveServer", "build_app", "describe", "serve", "EngineLoop"]


def describe(llm: Any, model_name: str, url: str) -> str:
    """The startup line: where the server listens and how the engine is configured."""
    cfg, backends = llm.config, llm.record.backends
    return (f"autodeploy serve: {url}/v1 (OpenAI API), model {model_name!r} ({type(llm.model).__name__}, "
            f"{'with' if llm.tokenizer is not None else 'no'} tokenizer), {cfg.dtype} on {cfg.device}, "
            f"max_batch_size {cfg.max_batch_size}, max_seq_len {cfg.max_seq_len}, max_num_tokens "
            f"{cfg.max_num_tokens}, {llm.engine.sizes.num_full_pages} KV pages of {cfg.page_size}, "
            f"attention {backends.get('attention')}, ssm {backends.get('ssm')}, compile {cfg.compile_mode}"
            + (f", speculative {cfg.speculative_config['method']}:{cfg.num_speculative_tokens}"
               if cfg.speculative_config else ""))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from e
    sock.listen(2048)
    return sock


def serve(llm: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "warning") -> None:
    """Serve ``llm`` until SIGINT/SIGTERM: then stop accepting, let in-flight requests finish for up
    to ``shutdown_timeout`` seconds, abort the rest and stop the engine."""
    import uvicorn

    sock = _bind(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
    app = build_app(llm, model_name, ready=lambda: print(describe(llm, model_name, url), file=sys.stderr,
                                                       flush=True))
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            access_log=log_level in ("info", "debug"))
    uvicorn.Server(config).run(sockets=[sock])


class LiveServer:
    """The server in a background thread on ``host`` and a free port (tests, benchmarks):
    ``with LiveServer(llm, name) as s: s.url``; ``s.loop`` is its engine loop."""

    def __init__(self, llm: Any, model_name: str, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = _bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.app = build_app(llm, model_name)
        self.loop: EngineLoop = self.app.state.engine_loop
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
