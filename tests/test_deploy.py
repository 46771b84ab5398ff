"""The container files cannot run here (no Docker engine); keep them consistent with the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from schemas import config
from schemas.database import SCHEMA_FILES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
SERVICES = ("ingestion", "processor", "metrics-api", "alerts")


def test_compose_uses_only_known_variables():
    known = set(config._VARIABLES)
    for name in SERVICES:
        environment = COMPOSE["services"][name]["environment"]
        assert set(environment) <= known, set(environment) - known
        assert {"KAFKA_BROKERS", "POSTGRES_DSN"} <= set(environment)
        config.load({k: str(v) for k, v in environment.items()})  # every value parses


def test_compose_seeds_postgres_from_the_schema_files():
    mounted = [
        volume.split(":")[0]
        for volume in COMPOSE["services"]["postgres"]["volumes"]
        if volume.endswith(".sql:ro")
    ]
    assert [Path(path).name for path in mounted] == list(SCHEMA_FILES)
    for path in mounted:
        assert (ROOT / "deploy" / path).resolve().is_file()


def test_compose_commands_name_modules_that_exist():
    for name in SERVICES:
        command = COMPOSE["services"][name]["command"]
        module = command[1].split(":")[0] if command[0] == "uvicorn" else command[command.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module


def test_prometheus_scrapes_each_service_on_the_port_it_listens_on():
    prometheus = COMPOSE["services"]["prometheus"]
    [config_file] = [volume.split(":")[0] for volume in prometheus["volumes"] if volume.endswith(".yml:ro")]
    scrape = yaml.safe_load((ROOT / "deploy" / config_file).read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    # The HTTP APIs serve /metrics on their own port, the one their command gives.
    for name in ("ingestion", "metrics-api"):
        command = COMPOSE["services"][name]["command"]
        assert f"{name}:{command[command.index('--port') + 1]}" in targets
    # The alert service serves its own on the port its command gives.
    command = COMPOSE["services"]["alerts"]["command"]
    assert f"alerts:{command[command.index('--metrics-port') + 1]}" in targets
    assert {target.split(":")[0] for target in targets} == set(SERVICES)
    assert set(prometheus["depends_on"]) == set(SERVICES)
