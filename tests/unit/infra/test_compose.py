"""The deployment file (``infra/compose/docker-compose.yml``) against the Compose Specification's
JSON schema (vendored beside it, ``compose-spec.json``; its source and licence in
``compose-spec.SOURCE.md``), and against the code: every service the product has, every
variable it sets one the configuration tree reads, with values the tree accepts, no SQL store on
SQLite inside a container, and Prometheus scraping each service's ``/metrics``."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic.aliases import AliasChoices

from concierge.configuration import SECTIONS, load_configuration
from core.settings import get_settings
from recruitment.settings import get_recruitment_settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "infra" / "compose" / "docker-compose.yml"
SCHEMA = ROOT / "infra" / "compose" / "compose-spec.json"
CLUSTER_ENV = ROOT / "infra" / "compose" / "cluster.env"
PROMETHEUS = ROOT / "infra" / "prometheus" / "prometheus.yml"
#: ``${NAME}``, ``${NAME:?message}``, ``${NAME:-default}``: compose's interpolation
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[?-][^}]*)?\}")


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    get_settings.cache_clear()
    get_recruitment_settings.cache_clear()
    yield
    get_settings.cache_clear()
    get_recruitment_settings.cache_clear()


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_the_compose_file_follows_the_compose_specification() -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator().iter_errors(compose())]
    assert not errors, errors


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["api-1"].__setitem__("comand", ["api"]),  # a misspelt key
        lambda d: d["services"]["postgres"].__setitem__("ports", 5432),  # not a list
        lambda d: d["services"]["worker-1"]["healthcheck"].__setitem__("retries", "six"),
        lambda d: d.__setitem__("service", {}),  # an unknown top-level key
    ],
)
def test_the_schema_refuses_a_broken_file(break_it: Any) -> None:
    broken = copy.deepcopy(compose())
    break_it(broken)
    assert list(validator().iter_errors(broken))


def concierge_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the concierge image (the others are Kafka, PostgreSQL, ...)."""
    return {
        name: service
        for name, service in document["services"].items()
        if "build" in service or str(service.get("image", "")).startswith("trial-concierge")
    }


def test_every_service_of_the_product_runs() -> None:
    services = concierge_services(compose())
    commands = {name: tuple(service["command"]) for name, service in services.items()}
    assert sorted(n for n, c in commands.items() if c[0] == "worker") == [
        "worker-1",
        "worker-2",
        "worker-3",
    ]
    assert sorted(n for n, c in commands.items() if c[0] == "api") == ["api-1", "api-2"]
    assert [n for n, c in commands.items() if c == ("monitor",)] == ["monitor"]
    assert [n for n, c in commands.items() if c[:2] == ("recruitment", "run")] == ["recruitment"]
    assert [n for n, c in commands.items() if c == ("followup",)] == ["followup"]
    assert [n for n, c in commands.items() if c[0] == "dashboard"] == ["dashboard"]
    assert [n for n, c in commands.items() if c == ("topics", "create")] == ["topics"]
    others = compose()["services"]
    assert sorted(n for n in others if n.startswith("kafka-")) == ["kafka-1", "kafka-2", "kafka-3"]
    assert others["postgres"]["image"].startswith("postgres:")


def tree_variables() -> set[str]:
    """Every environment variable the configuration tree reads."""
    names: set[str] = set()
    for section in SECTIONS:
        prefix = str(section.model_config.get("env_prefix", ""))
        for field_name, field in section.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif isinstance(alias, AliasChoices):
                names |= {c.upper() for c in alias.choices if isinstance(c, str)}
            if alias is None or section.model_config.get("validate_by_name"):
                names.add(f"{prefix}{field_name}".upper())
    return names


def cluster_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in CLUSTER_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """What a concierge container gets: cluster.env, then the service's ``environment`` with
    compose's ``${...}`` interpolation filled in with a value long enough to be a key."""
    assert service["env_file"] == "cluster.env"
    env = cluster_env()
    for name, value in (service.get("environment") or {}).items():
        env[name] = INTERPOLATION.sub("x" * 40, str(value))
    return env


def test_the_tree_knows_the_variables_it_is_checked_against() -> None:
    names = tree_variables()
    for expected in (
        "KAFKA_BOOTSTRAP_SERVERS",
        "CONCIERGE_API_URL",
        "CONCIERGE_PUBLIC_URL",
        "CONCIERGE_DC_THRESHOLD",
        "CONCIERGE_RECRUITMENT_URL",
        "CONCIERGE_LOG_FORMAT",
    ):
        assert expected in names, expected


def test_every_variable_the_compose_file_sets_is_in_the_configuration_tree() -> None:
    names = tree_variables()
    for name, service in concierge_services(compose()).items():
        unknown = sorted(set(service_env(service)) - names)
        assert not unknown, f"{name} sets variables no settings section reads: {unknown}"


def test_every_services_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values are ones the tree accepts (a typo in a value is exit 2 at start-up)."""
    for name, service in concierge_services(compose()).items():
        with monkeypatch.context() as patch:
            for variable in tree_variables():
                patch.delenv(variable, raising=False)
            for variable, value in service_env(service).items():
                patch.setenv(variable, value)
            get_settings.cache_clear()
            get_recruitment_settings.cache_clear()
            tree = load_configuration()
            settings = tree.settings
            assert settings.topic_replication_factor == 3, name
            for url in (
                settings.resolved_vault_url(),
                settings.resolved_audit_url(),
                settings.resolved_feasibility_url(),
                tree.recruitment.resolved_url(),
            ):
                assert url.startswith("postgresql+psycopg://"), (name, url)
            assert settings.log_format == "json"
            assert not settings.surveillance_monitor, "the monitor is a service of its own"
            if service.get("command") == ["api"]:  # every API process forwards to the monitor
                assert settings.surveillance_monitor_url == "http://monitor:8010", name


def test_prometheus_scrapes_every_service_with_metrics() -> None:
    document = compose()
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    env = cluster_env()
    assert env["CONCIERGE_WORKER_WEB_BIND"] == "0.0.0.0"
    assert env["CONCIERGE_RECRUITMENT_STATUS_BIND"] == "0.0.0.0"
    expected = {f"worker-{i}:6066" for i in (1, 2, 3)} | {"api-1:8000", "api-2:8000"}
    expected |= {"recruitment:6067", "monitor:8010"}
    assert targets == expected
    assert {t.split(":")[0] for t in targets} <= set(document["services"])


def test_the_image_holds_every_package() -> None:
    dockerfile = (ROOT / "infra" / "compose" / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert include is not None
    packages = {p.strip().strip('"').rstrip("*") for p in include.group(1).split(",")}
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, package
    assert "requirements.lock" in dockerfile  # the versions CI tested
