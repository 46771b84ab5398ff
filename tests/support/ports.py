"""Free ports for the servers the tests start: the same :func:`free_port` the local stack and
the dataflow's processes use."""

from __future__ import annotations

from schemas.network import free_port

__all__ = ["free_port"]
