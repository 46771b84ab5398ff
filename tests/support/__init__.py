"""What the tests share, so that no test module imports another's helpers.

Pytest fixtures and hooks stay in ``tests/conftest.py``; everything else a test module or a
benchmark takes from elsewhere is here:

- ``ports``: free ports for the servers the tests start.
- ``stacks``: the broker and Postgres (deploy.stack's launchers), ``TEST_PARTITIONS``, a new
  database on a server, signals to a whole Postgres server.
- ``servers``: an app under uvicorn in a thread (``serving``; the ingestion API as
  ``ServerThread``), waiting for a server process to answer.
- ``topics``: every record on a topic, read back as (key, JSON value).
- ``dataflow``: the end-to-end dataflow harness: its data set, expected rows, the
  processor as a process, a few answered calls.
- ``crash``: a run of kill -9s of the processor while calls are posted, every row checked.
- ``metric_windows``: ``llm_metrics`` windows built from raw calls, written into Postgres,
  read back through the query API.
- ``dimension_store``: dimension rows written as the dataflow's sink writes them.
- ``year_data``: a year of one key's one-minute windows, for retention.
- ``expected``: independent computations to compare with: alert transitions, a window's
  row, a roll-up bucket.
- ``rollup_cache``: the query API's roll-up cache read back, and roll-ups made slow.
- ``spans``: GenAI spans as tests describe them, and OTLP exports built from them by hand.
- ``auth_app``: a small app using api.auth as the APIs do, and a request event for it.
- ``alerts``: a webhook receiver that records every delivery.
"""
