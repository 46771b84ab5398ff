"""An ASGI app under uvicorn in a thread of the test process, on a free port (any app with
:func:`serving`, the ingestion API with :class:`ServerThread`); and waiting for a server
started as a process of its own to answer."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from api.ingestion import create_app
from schemas.config import Settings
from tests.support.ports import free_port
from tests.support.stacks import TEST_PARTITIONS


@contextmanager
def serving(app: Any, what: str = "the server") -> Iterator[str]:
    """Serve ``app`` (its lifespan run) until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), f"{what} failed to start"
        assert time.monotonic() < deadline, f"{what} did not start in 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_answering(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Until ``GET url`` answers 200; the end of ``log`` if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


class ServerThread:
    """The app under uvicorn in a thread of this process, on a free port."""

    def __init__(self, brokers: str, settings: Settings | None = None) -> None:
        # Keys and tenants are tested through this app in test_auth.py.
        settings = settings or Settings(kafka_brokers=brokers, topic_partitions=TEST_PARTITIONS, auth=False)
        app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the server failed to start"
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
