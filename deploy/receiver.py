"""A webhook receiver that prints the alerts it gets: ``python -m deploy.receiver``.

What ``just demo`` points its alert rule at, and a way to watch a rule of your own
(``--secret`` checks each delivery's ``X-StreamLens-Signature``). Every delivery is
answered ``204``; a transition delivered again (same ``Idempotency-Key``) is printed
as a repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple


class Alert(NamedTuple):
    key: str  # Idempotency-Key
    body: dict[str, Any]
    signed: bool | None  # None: no secret to check against
    repeat: bool
    received_at: float  # time.time()


def describe(alert: Alert) -> str:
    """One line for a person: what fired or resolved, on which window, with which value."""
    body = alert.body
    value = body.get("value")
    shown = "no value" if value is None else f"{value:.4g}"
    line = (
        f"alert {body.get('state', '?')}: {body.get('rule_name')!r} of {body.get('tenant_id')} - "
        f"{body.get('metric')} {shown} (threshold {body.get('threshold')}) "
        f"in the window {body.get('window_start')} .. {body.get('window_end')}"
    )
    if alert.signed is not None:
        line += ", signature ok" if alert.signed else ", SIGNATURE WRONG"
    return line + (" (delivered again)" if alert.repeat else "")


class WebhookReceiver(ThreadingHTTPServer):
    """Serves in a thread of its own; each delivery lands in :attr:`alerts`."""

    daemon_threads = True

    def __init__(self, port: int = 0, secret: str | None = None, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.alerts: queue.Queue[Alert] = queue.Queue()
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/alerts"

    def start(self) -> WebhookReceiver:
        threading.Thread(target=self.serve_forever, name="webhook-receiver", daemon=True).start()
        return self

    def received(self, key: str, payload: bytes, signature: str | None) -> None:
        signed = None
        if self.secret is not None:
            expected = "sha256=" + hmac.new(self.secret.encode(), payload, hashlib.sha256).hexdigest()
            signed = signature is not None and hmac.compare_digest(signature, expected)
        with self._lock:
            repeat = key in self._keys
            self._keys.add(key)
        try:
            body = json.loads(payload)
        except ValueError:
            body = {"state": "unreadable", "rule_name": payload[:200].decode(errors="replace")}
        self.alerts.put(Alert(key, body if isinstance(body, dict) else {}, signed, repeat, time.time()))


class _Handler(BaseHTTPRequestHandler):
    server: WebhookReceiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length)
        self.server.received(
            self.headers.get("Idempotency-Key", ""), payload, self.headers.get("X-StreamLens-Signature")
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the alerts are what gets printed."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.receiver", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9000, help="port on 127.0.0.1 (default %(default)s)")
    parser.add_argument("--secret", help="the rule's webhook_secret, to check signatures")
    args = parser.parse_args(argv)
    receiver = WebhookReceiver(args.port, args.secret).start()
    print(f"receiving alerts at {receiver.url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            print(describe(receiver.alerts.get()), flush=True)
    except KeyboardInterrupt:
        receiver.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
