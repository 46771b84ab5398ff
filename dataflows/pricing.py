"""What a call cost: genai-prices' table, overridden and extended by ``PRICES_FILE``.

INTERFACE CONTRACT (bodies to be written).
"""

from __future__ import annotations

from pathlib import Path

from dataflows.join import Call


class PriceBook:
    """Resolves each (provider, model) price once and reuses it."""

    def __init__(self, prices_file: Path | None = None) -> None:
        raise NotImplementedError

    def price(self, call: Call) -> Call:
        """Set ``call.cost_usd``: the per-call formula of the contract; None when the
        model has no known price; 0.0 for a timed-out call."""
        raise NotImplementedError
