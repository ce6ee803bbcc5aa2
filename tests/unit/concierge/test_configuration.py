"""The configuration tree (``concierge.configuration``): one section per package, composed and
validated together; a wrong value anywhere is one line naming the variable, and every start-up
verb prints that line and exits 2 without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from concierge.configuration import SECTIONS, Configuration, load_configuration
from core.settings import ConfigurationError, Settings, get_settings
from dashboards.settings import DashboardSettings
from infra.settings import BrokerSettings
from recruitment.settings import RecruitmentSettings, get_recruitment_settings
from surveillance_stream.settings import SurveillanceSettings
from tests.faults import free_port

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """The cached sections are read again from each test's environment."""
    get_settings.cache_clear()
    get_recruitment_settings.cache_clear()
    yield
    get_settings.cache_clear()
    get_recruitment_settings.cache_clear()


def test_the_tree_has_a_section_per_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCIERGE_API_PORT", "21001")
    monkeypatch.delenv("CONCIERGE_API_HOST", raising=False)
    monkeypatch.delenv("CONCIERGE_API_URL", raising=False)
    monkeypatch.delenv("CONCIERGE_PUBLIC_URL", raising=False)
    monkeypatch.delenv("CONCIERGE_RECRUITMENT_APP_BASE_URL", raising=False)
    monkeypatch.setenv("CONCIERGE_RECRUITMENT_YEARLY_CAP", "5")
    monkeypatch.setenv("CONCIERGE_SIGNAL_LEVELS", "model")
    monkeypatch.setenv("CONCIERGE_BROKER_HEAP", "1g")
    monkeypatch.setenv("CONCIERGE_DASHBOARD_ROWS", "25")
    tree = load_configuration()
    assert isinstance(tree, Configuration)
    assert [type(node) for _, node in tree] == list(SECTIONS)
    assert tree.settings is get_settings() and tree.settings.api_port == 21001
    assert tree.recruitment is get_recruitment_settings() and tree.recruitment.yearly_cap == 5
    assert tree.surveillance.levels == ("model",)
    assert tree.broker.heap == "1g"
    assert tree.dashboard.rows == 25
    assert tree.terminology.max_expansion == 50_000
    # addresses of the API follow the API's own host and port unless configured
    assert tree.recruitment.app_base_url == "http://127.0.0.1:21001"
    assert tree.dashboard.api == "http://127.0.0.1:21001"
    monkeypatch.setenv("CONCIERGE_API_URL", "http://api.example:9000")
    assert load_configuration().dashboard.api == "http://api.example:9000"


def test_every_wrong_variable_of_every_section_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrong = {
        "CONCIERGE_RECRUITMENT_TIMEZONE": "Mars/Olympus",
        "CONCIERGE_SIGNAL_ALPHA": "1.5",
        "CONCIERGE_BROKER_PORT": "-1",
        "CONCIERGE_DASHBOARD_REFRESH_SECONDS": "soon",
        "CONCIERGE_TERMINOLOGY_MAX_EXPANSION": "0",
        "CONCIERGE_TERMINOLOGY_STORE_URL": "postgresql://db/terms",
        "CONCIERGE_TERMINOLOGY_LANGUAGE_REFSETS": "gb,us",
        "CONCIERGE_FOLLOWUP_RELAY_INTERVAL_SECONDS": "never",
    }
    for name, value in wrong.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_configuration()
    line = str(caught.value)
    assert "\n" not in line and line.startswith("bad configuration: ")
    for name, value in wrong.items():
        assert f"{name}={value!r}: " in line, (name, line)
    assert "not a time zone: 'Mars/Olympus'" in line
    monkeypatch.setenv("CONCIERGE_API_PORT", "eighty")  # recruitment's defaults depend on it
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError) as caught:
        load_configuration()
    assert "CONCIERGE_API_PORT='eighty': " in str(caught.value)
    assert "CONCIERGE_SIGNAL_ALPHA='1.5': " in str(caught.value)


@pytest.mark.parametrize(
    ("name", "bad", "says"),
    [
        ("CONCIERGE_RECRUITMENT_SMTP_PORT", "smtp", "valid integer"),
        ("CONCIERGE_RECRUITMENT_COOLDOWN_DAYS", "-3", "greater than or equal to 0"),
        ("CONCIERGE_RECRUITMENT_DIGEST_HOUR", "24", "less than or equal to 23"),
        ("CONCIERGE_RECRUITMENT_TIMEZONE", "Europe/Londn", "not a time zone"),
        ("CONCIERGE_RECRUITMENT_EMAIL_ENABLED", "perhaps", "valid boolean"),
    ],
)
def test_a_bad_recruitment_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, bad: str, says: str
) -> None:
    monkeypatch.setenv(name, bad)
    with pytest.raises(ConfigurationError, match=f"^bad configuration: {name}={bad!r}: .*{says}"):
        load_configuration()


def test_a_secret_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCIERGE_TOKEN_KEY", "hunter2-is-too-short")
    with pytest.raises(ConfigurationError) as caught:
        get_settings()
    assert str(caught.value) == (
        "bad configuration: CONCIERGE_TOKEN_KEY: must be at least 32 bytes (RFC 7518 3.2)"
    )


def test_the_follow_up_secret_is_checked_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCIERGE_FOLLOWUP_SECRET", "hunter2-is-too-short")
    with pytest.raises(ConfigurationError) as caught:
        load_configuration()
    assert str(caught.value) == (
        "bad configuration: CONCIERGE_FOLLOWUP_SECRET: must be at least 32 bytes"
    )


def test_a_variable_read_under_two_names_is_named_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("CONCIERGE_RECRUITMENT_APP_BASE_URL", "")
    monkeypatch.setenv("CONCIERGE_SIGNAL_REQUIRE", "most")
    with pytest.raises(ConfigurationError, match=r"^bad configuration: CONCIERGE_SIGNAL_REQUIRE="):
        load_configuration()
    # the sections themselves read their variables alone too (domain code does not need the tree)
    assert SurveillanceSettings(require="all").require == "all"
    assert BrokerSettings(port=1234).port == 1234
    assert DashboardSettings(rows=30).rows == 30
    assert RecruitmentSettings(url="sqlite://").url == "sqlite://"
    assert Settings(api_port=1).api_port == 1


def start(args: list[str], bad: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CONCIERGE_HOME": str(tmp_path),
        # where a verb that wrongly started anyway would go: nowhere shared
        "CONCIERGE_API_PORT": str(free_port()),
        "CONCIERGE_WORKER_WEB_PORT": str(free_port()),
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        **bad,
    }
    return subprocess.run(
        [sys.executable, "-m", "concierge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "name", "bad"),
    [
        (["api"], "CONCIERGE_STREAM_MAX_LAG_SECONDS", "0"),
        (["worker"], "CONCIERGE_SIGNAL_MIN_EVENTS", "three"),
        (["worker"], "CONCIERGE_WORKER_WEB_BIND", "everywhere"),
        (["recruitment", "run", "--status-port", "0"], "CONCIERGE_RECRUITMENT_YEARLY_CAP", "0"),
        (["dashboard"], "CONCIERGE_DASHBOARD_ROWS", "lots"),
        (["followup"], "CONCIERGE_FOLLOWUP_BATCH_SIZE", "0"),
        (["broker", "status"], "CONCIERGE_BROKER_PORT", "ninety"),
    ],
)
def test_a_verb_started_with_a_bad_value_says_so_in_one_line(
    tmp_path: Path, args: list[str], name: str, bad: str
) -> None:
    done = start(args, {name: bad}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"concierge: bad configuration: {name}={bad!r}: "), line


def test_the_worker_pages_bind_loopback_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONCIERGE_WORKER_WEB_BIND", raising=False)
    assert Settings().worker_web_bind == "127.0.0.1"
    wildcard = Settings(worker_web_bind="0.0.0.0", worker_web_port=7001)
    assert wildcard.worker_address() == "http://127.0.0.1:7001"  # reached on loopback
    assert Settings(worker_web_bind="[::1]", worker_web_port=7002).worker_address() == (
        "http://[::1]:7002"
    )
    monkeypatch.setenv("CONCIERGE_WORKER_WEB_BIND", "everywhere")
    with pytest.raises(ValidationError, match="must be an IP address"):
        Settings()


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (
            {"CONCIERGE_STREAM_STANDBY": "true", "CONCIERGE_STREAM_CHECKPOINT_SECONDS": "0"},
            "CONCIERGE_STREAM_STANDBY needs CONCIERGE_STREAM_CHECKPOINT_SECONDS above 0",
        ),
        ({"CONCIERGE_STREAM_STANDBY": "perhaps"}, "CONCIERGE_STREAM_STANDBY='perhaps': "),
    ],
)
def test_standby_checkpoints_need_checkpoints_and_a_boolean(
    tmp_path: Path, bad: dict[str, str], says: str
) -> None:
    done = start(["worker"], bad, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("concierge: bad configuration: ") and says in line, line


def test_standby_checkpoints_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONCIERGE_STREAM_STANDBY", raising=False)
    assert Settings().stream_standby is False
    monkeypatch.setenv("CONCIERGE_STREAM_STANDBY", "true")
    assert load_configuration().settings.stream_standby is True
