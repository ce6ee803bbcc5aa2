"""The configuration tree: the product-wide settings and each package's section, read from the
environment and validated together when a process starts.

Every start-up verb (``concierge api``, ``worker``, ``recruitment run``, ``dashboard``, ``demo``)
calls :func:`load_configuration` first; a wrong value anywhere is one
:class:`~core.settings.ConfigurationError` naming every wrong variable, which the
``concierge`` command prints as one line before exiting with status 2 (no traceback). Sections
live in the package that reads them, so no domain package imports this module; see
"Configuration" in ``docs/explanation/architecture.md``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings

from core.settings import ConfigurationError, Settings, describe, get_settings
from dashboards.settings import DashboardSettings
from feasibility.disclosure.settings import DisclosureSettings, DisclosureSettingsError
from federation.settings import BunnySettings, HubSettings, NodeSettings
from followup.settings import FollowupSettings
from infra.settings import BrokerSettings
from recruitment.settings import RecruitmentSettings, get_recruitment_settings
from surveillance_stream.settings import SurveillanceSettings
from terminology.settings import TerminologySettings

#: Every section's class, the product-wide one first.
SECTIONS: tuple[type[BaseSettings], ...] = (
    Settings,
    RecruitmentSettings,
    SurveillanceSettings,
    BrokerSettings,
    DashboardSettings,
    DisclosureSettings,
    TerminologySettings,
    NodeSettings,
    HubSettings,
    FollowupSettings,
    BunnySettings,
)


class Configuration(BaseModel):
    """The whole configuration, one node per package."""

    model_config = ConfigDict(frozen=True)

    #: Kafka, home, the site's keys, tokens, the API and the worker (``core.settings``).
    settings: Settings
    #: ``CONCIERGE_RECRUITMENT_*`` (``recruitment.settings``).
    recruitment: RecruitmentSettings
    #: ``CONCIERGE_SIGNAL_*``, ``CONCIERGE_DEVICE_*`` (``surveillance_stream.settings``).
    surveillance: SurveillanceSettings
    #: The local broker (``infra.settings``).
    broker: BrokerSettings
    #: The regulator dashboard (``dashboards.settings``).
    dashboard: DashboardSettings
    #: ``CONCIERGE_DC_*``: disclosure control (``feasibility.disclosure.settings``).
    disclosure: DisclosureSettings
    #: ``CONCIERGE_TERMINOLOGY_*``: the terminology store and expansions (``terminology.settings``).
    terminology: TerminologySettings
    #: ``CONCIERGE_NODE_*``: this API as a node of a federation hub (``federation.settings``).
    node: NodeSettings
    #: ``CONCIERGE_HUB_*``: ``concierge hub`` (``federation.settings``).
    hub: HubSettings
    #: ``CONCIERGE_FOLLOWUP_*``: ``concierge followup`` (``followup.settings``).
    followup: FollowupSettings
    #: ``CONCIERGE_BUNNY_*``: ``concierge node poll`` (``federation.settings``).
    bunny: BunnySettings


def load_configuration() -> Configuration:
    """Every section from the environment; :class:`ConfigurationError` with one line naming each
    wrong variable (of all sections at once; of a section whose defaults come from the
    product-wide settings, such as recruitment's public address, once those are right)."""
    problems: list[str] = []
    try:
        settings: Settings | None = get_settings()
    except ConfigurationError as exc:
        settings = None
        problems.append(str(exc).removeprefix("bad configuration: "))
    loaded: dict[str, BaseSettings] = {}
    for name, build in (
        ("recruitment", get_recruitment_settings),
        ("surveillance", SurveillanceSettings),
        ("broker", BrokerSettings),
        ("dashboard", DashboardSettings),
        ("terminology", TerminologySettings),
        ("node", NodeSettings),
        ("hub", HubSettings),
        ("followup", FollowupSettings),
        ("bunny", BunnySettings),
    ):
        try:
            loaded[name] = build()
        except ValidationError as exc:
            problems.append(describe(exc, SECTIONS).removeprefix("bad configuration: "))
        except ConfigurationError:  # a default read from the product-wide settings, told above
            if settings is not None:  # pragma: no cover - only those defaults raise it
                raise
    try:
        loaded["disclosure"] = DisclosureSettings.load()
    except DisclosureSettingsError as exc:  # its own one line, naming each CONCIERGE_DC_* variable
        problems.append(str(exc))
    if problems or settings is None:
        raise ConfigurationError("bad configuration: " + "; ".join(problems))
    configuration = Configuration.model_validate({"settings": settings, **loaded})
    if configuration.dashboard.api_url is None:  # the API this configuration serves
        dashboard = configuration.dashboard.model_copy(update={"api_url": settings.api_address()})
        configuration = configuration.model_copy(update={"dashboard": dashboard})
    return configuration
