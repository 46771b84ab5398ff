"""The HTTP side: :mod:`api.ingestion` (events in) and :mod:`api.query` (rows out)."""
