"""A uvicorn server on a thread, for the server and judge tests (and benchmarks/bench_serve.py)."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from scratchllm.serve.server import bind_socket, url_host


class BackgroundServer:
    """Serves `app` on a thread:

        with BackgroundServer(app) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="none")

    `port=0` picks a free port; `url` is set once the socket listens.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = bind_socket(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = f"http://{url_host(self.host)}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
