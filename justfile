# StreamLens recipes. Run `just` to list them.
# The project's virtual environment comes first on PATH, activated or not.

set shell := ["bash", "-euo", "pipefail", "-c"]

export PATH := justfile_directory() / ".venv/bin" + ":" + env_var("PATH")

# Services read the stack's addresses from here (written by `just up`).
load_env := "set -a; if [ -f .local/env ]; then . .local/env; fi; set +a"

_default:
    @just --list

# Start a local broker and Postgres (no Docker), create topics and schema, write .local/env
up:
    python -m deploy.stack up

# Stop what `just up` started
down:
    python -m deploy.stack down

# Ingestion API on :8080 (HTTP_PORT overrides)
ingestion:
    {{load_env}}; exec uvicorn api.ingestion:app --host 0.0.0.0 --port "${HTTP_PORT:-8080}" --no-access-log --timeout-graceful-shutdown 10

# The metrics dataflow, with recovery under .local/recovery (processes: PROCESSES=N; --reset starts afresh)
processor *ARGS:
    {{load_env}}; exec python -m dataflows.run --recovery-dir .local/recovery {{ARGS}}

# Query API on :8081 (HTTP_PORT overrides)
metrics-api:
    {{load_env}}; exec uvicorn api.query:app --host 0.0.0.0 --port "${HTTP_PORT:-8081}" --no-access-log

# The alert service: judges rules as rows are written, delivers webhooks (--metrics-port N for Prometheus)
alerts *ARGS:
    {{load_env}}; exec python -m dataflows.alert_service {{ARGS}}

# Retention: windows older than RETENTION_DAYS deleted, their roll-ups kept (--every SECONDS: on a timer)
retention *ARGS:
    {{load_env}}; exec python -m schemas.retention {{ARGS}}

# Generated traffic against the ingestion API (see --help)
traffic *ARGS:
    {{load_env}}; exec python -m deploy.traffic {{ARGS}}

# The whole pipeline: stack, three services, traffic, then the metrics as a table
demo:
    exec python -m deploy.demo

# A new API key for TENANT (shown once)
create-key TENANT *ARGS:
    {{load_env}}; exec python -m api.keys create {{TENANT}} {{ARGS}}

# TENANT's dimensions: set from the next window boundary (NAMES, or --none), shown without NAMES
dimensions TENANT *NAMES:
    {{load_env}}; exec python -m api.tenants dimensions {{TENANT}} {{NAMES}}

# TENANT's ingestion quota: RATE events/s (0: none) and BURST at once; without RATE, shown (--default: back to INGEST_RATE)
quota TENANT *ARGS:
    {{load_env}}; exec python -m api.quotas {{TENANT}} {{ARGS}}

# Revoke the API key starting with PREFIX
revoke-key PREFIX:
    {{load_env}}; exec python -m api.keys revoke {{PREFIX}}

# The whole test suite; starts the broker and Postgres it needs
test *ARGS:
    python -m pytest {{ARGS}}

# The benchmarks, printing their figures
bench *ARGS:
    python -m tests.bench {{ARGS}}

# ruff, on everything
lint:
    ruff check .
    ruff format --check .
