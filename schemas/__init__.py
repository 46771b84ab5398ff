"""The shapes of StreamLens data, each defined once.

- :mod:`schemas.events`: the request and response events and the batch envelope.
- :mod:`schemas.rows`: the per-window metrics row.
- :mod:`schemas.deadletter`: the dead-letter record.
- :mod:`schemas.config`: the environment the services read.
- :mod:`schemas.topics` and :mod:`schemas.database`: the Kafka topics and the
  Postgres tables, created when missing.
"""
