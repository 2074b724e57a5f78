"""Run an ASGI app with a real uvicorn server on a loopback port in a background thread."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


def free_port(hosts: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A port free on every one of these (loopback) addresses, like the one port of all pods behind a Service."""
    while True:
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            try:
                for h in hosts[1:]:
                    with socket.socket() as t:
                        t.bind((h, port))
            except OSError:
                continue
            return port


class ThreadedServer:
    def __init__(self, app, port: int | None = None, host: str = "127.0.0.1", **kw):
        self.port = port or free_port((host,))
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False,
                                lifespan="on", **kw)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 15.0) -> "ThreadedServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > timeout or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
