"""infra/compose.yaml (+ compose.tls.yaml), read as YAML: services, health, volumes, drift.

No container engine runs here, so the checks are static: what each service is told
(every `FEDMQ_*` variable must be a field of that service's settings class, and its value
must validate), what it mounts, what it waits for, and that its broker login exists in
infra/rabbitmq/definitions.json with the password it is given.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.aggregator.task import load_task

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
COMPOSE_TLS = INFRA / "compose.tls.yaml"
DEFINITIONS = INFRA / "rabbitmq" / "definitions.json"
FEDMQ_SERVICES = ("aggregator", "evaluator", "trainer")
SETTINGS = {
    "aggregator": ("services.aggregator.settings", "AggregatorSettings"),
    "evaluator": ("services.evaluator.settings", "EvaluatorSettings"),
    "trainer": ("services.trainer.settings", "TrainerSettings"),
}
PREFIX = "FEDMQ_"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _interpolate(value: object) -> str:
    """Compose's `${VAR:-default}` with nothing set in the environment: the defaults."""
    return _VARIABLE.sub(lambda m: m["default"] or "", str(value))


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount target -> (source, read_only) for the short `source:target[:ro]` syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = _interpolate(entry).split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge for what the override uses: environment by name, volumes by target."""
    services = {name: dict(spec) for name, spec in base["services"].items()}
    for name, extra in override["services"].items():
        service = services[name]
        service["environment"] = {**service.get("environment", {}), **extra.get("environment", {})}
        by_target = {_interpolate(v).split(":")[1]: v for v in service.get("volumes", [])}
        by_target.update({_interpolate(v).split(":")[1]: v for v in extra.get("volumes", [])})
        service["volumes"] = list(by_target.values())
        service["ports"] = [*service.get("ports", []), *extra.get("ports", [])]
    return {**base, "services": services}


VARIANTS = {"plain": _load(COMPOSE), "tls": _merged(_load(COMPOSE), _load(COMPOSE_TLS))}


def _env(compose: dict[str, Any], service: str) -> dict[str, str]:
    environment = compose["services"][service].get("environment", {})
    return {key: _interpolate(value) for key, value in environment.items()}


def _settings_class(service: str) -> type[BaseSettings]:
    module_name, class_name = SETTINGS[service]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        pytest.skip(f"{module_name} does not exist yet: cannot check {service}'s variables")
    settings: type[BaseSettings] = getattr(module, class_name)
    assert settings.model_config.get("env_prefix") == PREFIX
    return settings


def _settings_values(env: dict[str, str]) -> dict[str, str]:
    return {key.removeprefix(PREFIX).lower(): v for key, v in env.items() if key.startswith(PREFIX)}


def _password_verifies(user: str, password: str) -> bool:
    users = {u["name"]: u for u in json.loads(DEFINITIONS.read_text())["users"]}
    raw = base64.b64decode(users[user]["password_hash"])
    return hashlib.sha256(raw[:4] + password.encode()).digest() == raw[4:]


def test_compose_runs_rabbitmq_aggregator_evaluator_and_trainers() -> None:
    compose = VARIANTS["plain"]
    assert set(compose["services"]) == {"rabbitmq", *FEDMQ_SERVICES}
    assert compose["services"]["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert "127.0.0.1:15672:15672" in compose["services"]["rabbitmq"]["ports"]


def test_fedmq_services_share_one_image_built_from_the_dockerfile() -> None:
    services = VARIANTS["plain"]["services"]
    images = {_interpolate(services[s]["image"]) for s in FEDMQ_SERVICES}
    builds = {json.dumps(services[s]["build"], sort_keys=True) for s in FEDMQ_SERVICES}
    assert len(images) == 1 and len(builds) == 1
    build = services["aggregator"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == (
        INFRA / "docker" / "Dockerfile"
    )


def test_rabbitmq_mounts_the_definitions_its_config_loads() -> None:
    rabbitmq = VARIANTS["plain"]["services"]["rabbitmq"]
    mounts = _volumes(rabbitmq)
    conf_source, conf_read_only = mounts["/etc/rabbitmq/rabbitmq.conf"]
    conf = (INFRA / conf_source).read_text()
    [loaded] = re.findall(r"^load_definitions\s*=\s*(\S+)", conf, flags=re.MULTILINE)
    definitions_source, definitions_read_only = mounts[loaded]
    assert (INFRA / definitions_source).resolve() == DEFINITIONS
    assert conf_read_only and definitions_read_only
    assert mounts["/var/lib/rabbitmq"][0] in VARIANTS["plain"]["volumes"]


def test_rabbitmq_is_healthy_when_diagnostics_ping_answers() -> None:
    check = VARIANTS["plain"]["services"]["rabbitmq"]["healthcheck"]
    assert check["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]


@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_fedmq_service_waits_for_healthy_dependencies(service: str) -> None:
    services = VARIANTS["plain"]["services"]
    depends_on = services[service]["depends_on"]
    assert "rabbitmq" in depends_on
    for dependency, condition in depends_on.items():
        assert condition == {"condition": "service_healthy"}, (service, dependency)
        assert "healthcheck" in services[dependency], f"{dependency} never becomes healthy"


@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_fedmq_service_is_healthy_when_its_metrics_port_answers(service: str) -> None:
    spec = VARIANTS["plain"]["services"][service]
    assert spec["healthcheck"]["test"] == ["CMD", "fedmq-healthcheck"]
    assert int(_env(VARIANTS["plain"], service)["FEDMQ_METRICS_PORT"]) > 0


def test_aggregator_checkpoints_on_a_named_volume_and_reads_the_mounted_task_file() -> None:
    compose = VARIANTS["plain"]
    env = _env(compose, "aggregator")
    mounts = _volumes(compose["services"]["aggregator"])
    checkpoint_volume, _ = mounts[env["FEDMQ_CHECKPOINT_DIR"]]
    assert checkpoint_volume in compose["volumes"]
    task_source, task_read_only = mounts[env["FEDMQ_TASK_FILE"]]
    assert task_read_only
    task = load_task(INFRA / task_source)
    assert task.task_id == env["FEDMQ_TASK_ID"]


@pytest.mark.parametrize("service", ["evaluator", "trainer"])
def test_data_is_mounted_read_only_where_the_service_reads_it(service: str) -> None:
    env = _env(VARIANTS["plain"], service)
    source, read_only = _volumes(VARIANTS["plain"]["services"][service])[env["FEDMQ_DATA_DIR"]]
    assert read_only
    assert source == "../data"


def test_trainer_replicas_scale_without_fixed_names_or_host_ports() -> None:
    trainer = VARIANTS["plain"]["services"]["trainer"]
    assert "container_name" not in trainer and "hostname" not in trainer
    assert "ports" not in trainer
    assert trainer["entrypoint"] == ["fedmq-site"]
    assert trainer["command"] == ["trainer"]


def test_every_site_a_trainer_replica_can_be_has_a_password_file() -> None:
    compose = VARIANTS["plain"]
    env = _env(compose, "trainer")
    source, read_only = _volumes(compose["services"]["trainer"])[env["SITE_PASSWORD_DIR"]]
    assert read_only
    sites = int(env["FEDMQ_NUM_SITES"])
    present = {p.name for p in (INFRA / source).iterdir()}
    assert present == {f"trainer-site-{i}" for i in range(sites)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_every_fedmq_variable_a_service_sets_is_a_field_of_its_settings(
    service: str, variant: str
) -> None:
    settings = _settings_class(service)
    names = set(_settings_values(_env(VARIANTS[variant], service)))
    unknown = names - set(settings.model_fields)
    assert not unknown, f"{service} sets FEDMQ_ variables its settings ignore: {unknown}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_service_environment_validates_against_its_settings(service: str, variant: str) -> None:
    settings = _settings_class(service)
    env = _settings_values(_env(VARIANTS[variant], service))
    values: dict[str, object] = dict(env)
    if service == "trainer":  # derived per replica by fedmq-site; the last site is the bound
        last = int(env["num_sites"]) - 1
        values |= {"trainer_id": f"trainer-site-{last}", "site_index": last}
        values["amqp_url"] = f"amqp://trainer-site-{last}:x@rabbitmq:5672/fedmq"
    parsed = settings.model_validate(values)
    assert parsed.metrics_port == 9100  # type: ignore[attr-defined]
    assert parsed.task_id == "pneumonia"  # type: ignore[attr-defined]


def _login(url: str) -> tuple[str, str, str, int | None, str]:
    parts = urlsplit(url)
    assert parts.username and parts.password and parts.hostname
    return parts.scheme, unquote(parts.username), unquote(parts.password), parts.port, parts.path


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("service", ["aggregator", "evaluator"])
def test_service_logs_in_as_its_own_definitions_user(service: str, variant: str) -> None:
    env = _env(VARIANTS[variant], service)
    scheme, user, password, port, vhost = _login(env["FEDMQ_AMQP_URL"])
    assert user == service
    assert _password_verifies(user, password)
    assert urlsplit(env["FEDMQ_AMQP_URL"]).hostname == "rabbitmq"
    assert vhost == "/fedmq"
    assert (scheme, port) == (("amqp", 5672) if variant == "plain" else ("amqps", 5671))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_url_template_gives_each_site_its_own_login(variant: str) -> None:
    env = _env(VARIANTS[variant], "trainer")
    folder = INFRA / "secrets" / "dev" / "trainers"
    for site in ("trainer-site-0", "trainer-site-7"):
        password = (folder / site).read_text().strip()
        url = env["SITE_AMQP_URL_TEMPLATE"].format(user=site, password=password)
        scheme, user, given, port, vhost = _login(url)
        assert (user, vhost) == (site, "/fedmq")
        assert _password_verifies(user, given)
        assert (scheme, port) == (("amqp", 5672) if variant == "plain" else ("amqps", 5671))


@pytest.mark.parametrize("service", FEDMQ_SERVICES)
def test_tls_override_gives_each_service_a_mounted_ca_and_forbids_plain_amqp(service: str) -> None:
    compose = VARIANTS["tls"]
    env = _env(compose, service)
    assert env["FEDMQ_ALLOW_INSECURE_REMOTE"] == "false"
    mounts = _volumes(compose["services"][service])
    for variable in ("FEDMQ_CA_FILE", "FEDMQ_CERT_FILE", "FEDMQ_KEY_FILE"):
        folder = str(Path(env[variable]).parent)
        assert folder in mounts and mounts[folder][1], (service, variable)


def test_tls_override_replaces_the_broker_config_with_the_amqps_one() -> None:
    mounts = _volumes(VARIANTS["tls"]["services"]["rabbitmq"])
    source, _ = mounts["/etc/rabbitmq/rabbitmq.conf"]
    assert source == "./rabbitmq/rabbitmq.tls.conf"
    conf = (INFRA / source).read_text()
    for path in re.findall(r"^ssl_options\.\w+file\s*=\s*(\S+)", conf, flags=re.MULTILINE):
        assert str(Path(path).parent) in mounts, path
    assert "127.0.0.1:5671:5671" in VARIANTS["tls"]["services"]["rabbitmq"]["ports"]
