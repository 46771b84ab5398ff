"""Ports on this machine, for the processes a service or the local stack starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free right now on 127.0.0.1, chosen by the kernel rather than guessed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
