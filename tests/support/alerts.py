"""A webhook receiver for the alert tests: it records every delivery, and answers 503 while it is
down or to first attempts chosen by the test."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


class Delivery(NamedTuple):
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered


class Receiver:
    """A webhook receiver: records every POST; answers 503 while it is down, and to the
    first attempt of each key ``refuse_first`` picks; answers each in 0–50 ms."""

    def __init__(self, refuse_first: Callable[[str], bool] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self._refuse_first = refuse_first
        self._seen: set[str] = set()
        self.down_for: float = 0.0  # seconds from the first delivery on
        self._first: float | None = None
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/hook", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        body = await request.body()
        key = request.headers.get("idempotency-key", "")
        await asyncio.sleep((hash(key) % 50) / 1000)
        now = time.monotonic()
        with self._lock:
            self._first = now if self._first is None else self._first
            refused = self._refuse_first is not None and key not in self._seen and self._refuse_first(key)
            self._seen.add(key)
            status = 503 if refused or now - self._first < self.down_for else 200
            self.deliveries.append(Delivery(now, dict(request.headers), body, status))
        return Response(status_code=status)

    def accepted(self) -> list[Delivery]:
        with self._lock:
            return [item for item in self.deliveries if item.status == 200]

    def wait_for(self, count: int, timeout: float) -> list[Delivery]:
        """The accepted deliveries once there are ``count`` distinct keys (or the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            accepted = self.accepted()
            if len({item.headers["idempotency-key"] for item in accepted}) >= count:
                return accepted
            if time.monotonic() > deadline:
                return accepted
            time.sleep(0.05)
