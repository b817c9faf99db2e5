"""The image, read statically: Dockerfile stages, build context, and its two helper scripts.

No Docker daemon runs here; the helper scripts (site identity, health check) are plain
Python and run for real.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import re
import threading
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _args() -> dict[str, str]:
    found = {}
    for instruction, text in _instructions():
        if instruction == "ARG" and "=" in text:
            name, value = text.split("=", 1)
            found[name] = value
    return found


@cache
def _load_script(name: str) -> ModuleType:
    path = REPO / "infra" / "docker" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_is_built_in_a_uv_builder_stage_with_the_locked_dependencies() -> None:
    builder, runtime = _stages()[-2], _stages()[-1]
    runs = " ".join(text for instruction, text in builder if instruction == "RUN")
    assert "uv sync --frozen --no-dev" in runs
    assert "--no-editable" in runs  # the runtime gets a real install, not a link to /src
    copied = [text for instruction, text in runtime if instruction == "COPY"]
    assert any("--from=builder /opt/venv" in text for text in copied)
    assert not any("uv" in text for instruction, text in runtime if instruction == "RUN")


def test_runtime_runs_as_a_non_root_user_with_fedmq_as_entrypoint() -> None:
    runtime = _stages()[-1]
    [user] = [text for instruction, text in runtime if instruction == "USER"]
    uid = user.split(":")[0]
    uid = _args().get(uid.strip("${}"), uid)
    assert int(uid) >= 1000
    [entrypoint] = [text for instruction, text in runtime if instruction == "ENTRYPOINT"]
    assert entrypoint == '["fedmq"]'
    [healthcheck] = [text for instruction, text in runtime if instruction == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["fedmq-healthcheck"]')


def test_pytorch_defaults_to_the_cpu_index_and_the_runtime_base_is_a_build_argument() -> None:
    args = _args()
    assert args["TORCH_INDEX_URL"] == CPU_INDEX
    assert _stages()[-1][0] == ("FROM", "${RUNTIME_BASE} AS runtime")
    assert "RUNTIME_BASE" in args


def test_cpu_build_skips_every_cuda_wheel_the_locked_torch_pulls_in() -> None:
    # Given the package names the Dockerfile's sed expression turns into --no-install-package
    [sed] = re.findall(r"sed -n -E 's/(\^\(.*?\)==)\.\*/", DOCKERFILE.read_text())
    skipped = re.compile(sed)
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    # When we walk what torch and torchvision depend on under Linux
    pending, reached = ["torch", "torchvision"], set()
    while pending:
        name = pending.pop()
        if name in reached:
            continue
        reached.add(name)
        pending += [d["name"] for d in packages[name].get("dependencies", [])]
    # Then every CUDA/NVIDIA/triton wheel among them is skipped, and nothing else is
    gpu = {n for n in reached if re.match(r"(nvidia|cuda|triton)", n)}
    assert gpu, "the lock no longer pulls CUDA wheels: is the skip list still needed?"
    assert {n for n in reached if skipped.match(f"{n}==1")} == gpu | {"torch", "torchvision"}


def _ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches decides, `!pattern` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.removeprefix("!")
        if any(
            fnmatch.fnmatch(prefix, bare)
            or fnmatch.fnmatch(prefix, bare.removeprefix("**/"))
            or fnmatch.fnmatch(parts[-1], bare.removeprefix("**/"))
            for prefix in prefixes
        ):
            ignored = not negated
    return ignored


def _ignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/ckpt.bin",
        "data/pneumoniamnist.npz",
        "services/sub/cached.npz",
        ".pytest_cache/v",
        ".mypy_cache/x",
        "infra/secrets/dev/aggregator",
        "services/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_build_context_leaves_out_environments_data_runs_secrets_and_caches(path: str) -> None:
    assert _ignored(_ignore_patterns(), path)


def test_build_context_keeps_the_bundled_dataset_and_its_licence() -> None:
    for path in (
        "services/common/data/bundled/pneumoniamnist.npz",
        "services/common/data/bundled/README.md",
    ):
        assert (REPO / path).is_file(), path
        assert not _ignored(_ignore_patterns(), path), f".dockerignore drops {path}"


def test_build_context_keeps_every_file_the_dockerfile_copies() -> None:
    sources = []
    for instruction, text in _instructions():
        if instruction == "COPY" and "--from=" not in text:
            words = [w for w in text.split() if not w.startswith("--")]
            sources += words[:-1]
    assert "uv.lock" in sources and "services" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(_ignore_patterns(), source), f".dockerignore drops {source}"


# -- fedmq-site: identity of a scaled trainer replica -----------------------------------


def _site() -> ModuleType:
    return _load_script("fedmq_site.py")


def _resolve(env: dict[str, str], *, hostname: str, reverse: str | None) -> dict[str, str]:
    passwords = {"trainer-site-3": "p@ss/word", "trainer-site-0": "zero"}
    return _site().resolve(  # type: ignore[no-any-return]
        env, hostname=hostname, reverse_name=lambda: reverse, read_password=passwords.__getitem__
    )


def test_statefulset_pod_takes_its_ordinal_as_site_index() -> None:
    resolved = _resolve({}, hostname="trainer-3", reverse=None)
    assert resolved == {"FEDMQ_SITE_INDEX": "3", "FEDMQ_TRAINER_ID": "trainer-site-3"}


@pytest.mark.parametrize("name", ["fedmq-trainer-4.fedmq_default.", "fedmq_trainer_4"])
def test_compose_replica_number_minus_one_is_its_site_index(name: str) -> None:
    resolved = _resolve({}, hostname="3f2a9c1b0d4e", reverse=name)
    assert resolved["FEDMQ_SITE_INDEX"] == "3"
    assert resolved["FEDMQ_TRAINER_ID"] == "trainer-site-3"


def test_site_url_is_built_from_the_template_with_a_quoted_password() -> None:
    env = {"SITE_AMQP_URL_TEMPLATE": "amqps://{user}:{password}@rabbitmq:5671/fedmq"}
    resolved = _resolve(env, hostname="trainer-3", reverse=None)
    assert resolved["FEDMQ_AMQP_URL"] == "amqps://trainer-site-3:p%40ss%2Fword@rabbitmq:5671/fedmq"


def test_explicit_identity_and_url_win_over_derivation() -> None:
    env = {
        "FEDMQ_SITE_INDEX": "0",
        "FEDMQ_TRAINER_ID": "hospital-a",
        "FEDMQ_AMQP_URL": "amqps://hospital-a:x@broker/fedmq",
        "SITE_AMQP_URL_TEMPLATE": "amqp://{user}:{password}@rabbitmq/fedmq",
    }
    resolved = _resolve(env, hostname="trainer-5", reverse=None)
    assert resolved == {"FEDMQ_SITE_INDEX": "0"}


def test_a_replica_without_ordinal_or_compose_name_is_refused() -> None:
    site = _site()
    with pytest.raises(site.SiteIdentityError, match="FEDMQ_SITE_INDEX"):
        _resolve({}, hostname="3f2a9c1b0d4e", reverse="3f2a9c1b0d4e")


# -- fedmq-healthcheck -------------------------------------------------------------------


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(b"fedmq_model_version 3\n")

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def metrics_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_healthcheck_passes_when_the_metrics_endpoint_answers(
    metrics_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_METRICS_PORT", str(metrics_port))
    assert _load_script("healthcheck.py").main() == 0


def test_healthcheck_fails_when_nothing_listens_on_the_metrics_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_METRICS_PORT", "1")  # privileged port: nothing of ours there
    assert _load_script("healthcheck.py").main() == 1


def test_every_fedmq_variable_the_image_sets_is_a_settings_field() -> None:
    from services.common.settings import ServiceSettings
    from services.trainer.settings import TrainerSettings

    [env] = [text for instruction, text in _stages()[-1] if instruction == "ENV"]
    names = {m.lower() for m in re.findall(r"FEDMQ_(\w+)=", env)}
    assert names == {"data_dir", "metrics_port"}
    assert "metrics_port" in ServiceSettings.model_fields  # every service serves metrics
    assert "data_dir" in TrainerSettings.model_fields  # where MedMNIST files are read


def test_healthcheck_fails_when_the_main_loop_stopped_going_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    from services.aggregator.metrics import AggregatorMetrics
    from services.common.metrics import serve_metrics

    # Given an aggregator's metrics served from their side thread
    metrics = AggregatorMetrics()
    port = serve_metrics(metrics.registry, 0)
    monkeypatch.setenv("FEDMQ_METRICS_PORT", str(port))
    healthcheck = _load_script("healthcheck.py")
    # When its main loop went round just now, it is healthy
    metrics.on_tick()
    assert healthcheck.main() == 0
    # When its last round is older than the limit, it is not, though /metrics still answers
    metrics.loop_tick.set(time.time() - healthcheck.STUCK_AFTER_S - 10)
    assert healthcheck.main() == 1
