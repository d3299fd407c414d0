"""The docker-compose stack, checked statically (no Docker needed).

docker-compose.yml, the gateway's Dockerfile, triton/Dockerfile and configs/compose.toml each
repeat facts the others rely on (service names, ports, mount paths, versions). These tests read
all of them and fail when one drifts from the others.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import GatewayConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "configs" / "compose.toml"
GATEWAY_DOCKERFILE = ROOT / "Dockerfile"
TRITON_DOCKERFILE = ROOT / "triton" / "Dockerfile"
MODEL_REPOSITORY = ROOT / "model_repository"
FETCH_SCRIPT = ROOT / "triton" / "fetch.sh"

GATEWAY_SERVICE = "gateway"
# NGC Triton container release for each nvidia-pytriton version whose embedded server we run
# locally (triton/fetch.sh): pytriton 0.7.0 embeds Triton 2.51.0, which NGC ships as 24.10.
NGC_RELEASE_FOR_PYTRITON = {"0.7.0": "24.10"}
TRITON_IMAGE_REPO = "nvcr.io/nvidia/tritonserver"


# ---------------------------------------------------------------------------------------------
# Reading the files


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command line, or None."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) for each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            options = parts[2].split(",") if len(parts) > 2 else []
            out.append((source, target, "ro" in options))
        else:
            out.append((volume["source"], volume["target"], bool(volume.get("read_only", False))))
    return out


def same_path(source: str, relative: Path) -> bool:
    """Whether a compose bind-mount source (relative to the compose file) is `relative`."""
    return (COMPOSE_FILE.parent / source).resolve() == (ROOT / relative).resolve()


def triton_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if command_args(s)[:1] == ["tritonserver"]}


def published_container_ports(service: dict[str, Any]) -> dict[int, int]:
    """{container port: host port} from the short or long `ports` syntax."""
    out = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out[int(port["target"])] = int(port["published"])
            continue
        spec = str(port).split("/")[0]
        parts = spec.split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        joined.append((keyword.upper(), rest.strip()))
        current = ""
    return joined


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"expected the JSON (exec) form, got {arguments!r}"
    return value


def gateway_cmd() -> list[str]:
    cmds = [exec_form(a) for k, a in dockerfile_instructions(GATEWAY_DOCKERFILE) if k == "CMD"]
    assert len(cmds) == 1, "the gateway Dockerfile should have exactly one CMD"
    return cmds[0]


def effective_gateway_config() -> GatewayConfig:
    """configs/compose.toml as the container's CMD loads it (with its --host/--port overrides)."""
    cmd = gateway_cmd()
    port = flag(cmd, "--port")
    return load_config(COMPOSE_CONFIG, host=flag(cmd, "--host"), port=int(port) if port else None)


# ---------------------------------------------------------------------------------------------
# The gateway's upstreams are the compose Triton services


def test_every_instance_is_a_triton_service_on_its_http_port(services: dict[str, dict[str, Any]]) -> None:
    config = load_config(COMPOSE_CONFIG)
    tritons = triton_services(services)
    assert config.upstream.instances, "configs/compose.toml lists no instances"
    for instance in config.upstream.instances:
        url = urlsplit(instance.url)
        assert url.hostname in services, f"{instance.url}: no compose service named {url.hostname!r}"
        assert url.hostname in tritons, f"{instance.url}: service {url.hostname!r} does not run tritonserver"
        http_port = flag(command_args(tritons[url.hostname]), "--http-port")
        assert http_port is not None, f"{url.hostname}: tritonserver needs an explicit --http-port"
        assert int(http_port) == url.port, f"{instance.url}: {url.hostname} listens on HTTP {http_port}"


def test_every_triton_service_is_used_and_awaited(services: dict[str, dict[str, Any]]) -> None:
    config = load_config(COMPOSE_CONFIG)
    tritons = triton_services(services)
    assert len(tritons) >= 2, "the stack should run a fleet of at least two Triton servers"
    listed = {urlsplit(i.url).hostname for i in config.upstream.instances}
    assert set(tritons) == listed, "every Triton service should be listed in configs/compose.toml"
    depends_on = services[GATEWAY_SERVICE].get("depends_on", {})
    assert isinstance(depends_on, dict), "gateway.depends_on needs the long form (with conditions)"
    for name in tritons:
        assert depends_on.get(name, {}).get("condition") == "service_healthy", (
            f"the gateway should wait for {name} to be healthy"
        )


# ---------------------------------------------------------------------------------------------
# The gateway container


def test_gateway_publishes_its_configured_port(services: dict[str, dict[str, Any]]) -> None:
    config = effective_gateway_config()
    published = published_container_ports(services[GATEWAY_SERVICE])
    assert config.server.port in published, (
        f"the gateway listens on {config.server.port} but compose publishes {sorted(published)}"
    )
    assert config.server.host == "0.0.0.0", "inside a container the gateway must listen on all interfaces"
    exposed = [a for k, a in dockerfile_instructions(GATEWAY_DOCKERFILE) if k == "EXPOSE"]
    assert exposed == [str(config.server.port)]


def test_gateway_healthcheck_asks_its_own_port() -> None:
    config = effective_gateway_config()
    checks = [a for k, a in dockerfile_instructions(GATEWAY_DOCKERFILE) if k == "HEALTHCHECK"]
    assert len(checks) == 1
    urls = re.findall(r"http://[\w.\-]+:(\d+)(/[\w/]+)", checks[0])
    assert urls == [(str(config.server.port), "/v2/health/live")]


def test_gateway_mounts_the_config_its_cmd_reads(services: dict[str, dict[str, Any]]) -> None:
    gateway = services[GATEWAY_SERVICE]
    build = gateway.get("build")
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context / dockerfile).resolve() == GATEWAY_DOCKERFILE.resolve()

    config_path = flag(gateway_cmd(), "--config")
    assert config_path is not None, "the gateway CMD should pass --config"
    targets = {target: (source, ro) for source, target, ro in mounts(gateway)}
    assert config_path in targets, f"nothing is mounted at {config_path}, which the CMD reads"
    source, read_only = targets[config_path]
    assert same_path(source, COMPOSE_CONFIG.relative_to(ROOT)), f"{config_path} is mounted from {source}"
    assert read_only


def test_gateway_cmd_serves() -> None:
    cmd = gateway_cmd()
    assert cmd[:4] == ["python", "-m", "gateway", "serve"]


def test_gateway_image_installs_cpu_torch() -> None:
    runs = " ".join(a for k, a in dockerfile_instructions(GATEWAY_DOCKERFILE) if k == "RUN")
    assert "https://download.pytorch.org/whl/cpu" in runs
    assert any(k == "USER" and a not in ("root", "0") for k, a in dockerfile_instructions(GATEWAY_DOCKERFILE))


# ---------------------------------------------------------------------------------------------
# The Triton containers


def test_each_triton_serves_the_mounted_model_repository(services: dict[str, dict[str, Any]]) -> None:
    for name, service in triton_services(services).items():
        repository = flag(command_args(service), "--model-repository")
        assert repository is not None, f"{name}: no --model-repository"
        sources = {target: source for source, target, _ in mounts(service)}
        assert repository in sources, f"{name}: --model-repository={repository} is not a mount target"
        assert same_path(sources[repository], Path("model_repository")), (
            f"{name}: {repository} is mounted from {sources[repository]}, not ./model_repository"
        )


def test_the_gateway_drives_loading_of_the_repository_the_tritons_serve(services: dict[str, dict[str, Any]]) -> None:
    """With [repository] path set, the gateway loads models itself: each Triton must be in
    explicit model-control mode (else its load calls are refused), and the gateway's container
    must see ./model_repository at that path."""
    path = effective_gateway_config().repository.path
    assert path, "configs/compose.toml: no [repository] path: Triton would manage loading alone"
    sources = {target: source for source, target, _ in mounts(services[GATEWAY_SERVICE])}
    assert path in sources, f"the gateway reads {path} but nothing is mounted there"
    assert same_path(sources[path], Path("model_repository")), f"{path} is mounted from {sources[path]}"
    for name, service in triton_services(services).items():
        assert flag(command_args(service), "--model-control-mode") == "explicit", f"{name}: not in explicit mode"


def test_each_triton_healthcheck_asks_its_http_port(services: dict[str, dict[str, Any]]) -> None:
    for name, service in triton_services(services).items():
        http_port = flag(command_args(service), "--http-port")
        test = service["healthcheck"]["test"]
        text = test if isinstance(test, str) else " ".join(test)
        assert re.search(rf"localhost:{http_port}/v2/health/ready\b", text), f"{name}: healthcheck {text!r}"


def test_triton_ports_are_distinct_within_a_service(services: dict[str, dict[str, Any]]) -> None:
    for name, service in triton_services(services).items():
        ports = [flag(command_args(service), f) for f in ("--http-port", "--grpc-port", "--metrics-port")]
        assert None not in ports and len(set(ports)) == 3, f"{name}: {ports}"


def test_every_model_directory_has_a_matching_config() -> None:
    models = sorted(p for p in MODEL_REPOSITORY.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert models, "model_repository/ holds no models"
    for model in models:
        config = model / "config.pbtxt"
        assert config.is_file(), f"{model.name}: no config.pbtxt"
        names = re.findall(r'^\s*name\s*:\s*"([^"]*)"', config.read_text(), flags=re.MULTILINE)
        # The first top-level `name:` is the model's (inputs and outputs come later).
        assert names and names[0] == model.name, f"{model.name}/config.pbtxt names the model {names[:1]}"
        versions = [p for p in model.iterdir() if p.is_dir() and p.name.isdigit()]
        assert versions, f"{model.name}: no numbered version directory"


def triton_base_image_default() -> str:
    args = [a for k, a in dockerfile_instructions(TRITON_DOCKERFILE) if k == "ARG" and a.startswith("TRITON_IMAGE=")]
    assert len(args) == 1, "triton/Dockerfile should declare ARG TRITON_IMAGE=<default>"
    return args[0].split("=", 1)[1]


def expected_triton_image() -> str:
    match = re.search(r"^PYTRITON_VERSION=(\S+)", FETCH_SCRIPT.read_text(), flags=re.MULTILINE)
    assert match, "triton/fetch.sh no longer sets PYTRITON_VERSION"
    pytriton = match.group(1)
    assert pytriton in NGC_RELEASE_FOR_PYTRITON, (
        f"local Triton comes from nvidia-pytriton {pytriton}: add the NGC release with the same "
        "server version here and use it in docker-compose.yml and triton/Dockerfile"
    )
    return f"{TRITON_IMAGE_REPO}:{NGC_RELEASE_FOR_PYTRITON[pytriton]}-py3"


def test_triton_image_matches_the_local_server_version(services: dict[str, dict[str, Any]]) -> None:
    expected = expected_triton_image()
    assert triton_base_image_default() == expected
    froms = [a for k, a in dockerfile_instructions(TRITON_DOCKERFILE) if k == "FROM"]
    assert froms == ["${TRITON_IMAGE}"]
    for name, service in triton_services(services).items():
        build = service.get("build")
        if build is None:
            assert service.get("image") == expected, f"{name}: image {service.get('image')!r}"
            continue
        assert isinstance(build, dict), f"{name}: build needs its TRITON_IMAGE arg"
        assert (COMPOSE_FILE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == (
            TRITON_DOCKERFILE.resolve()
        )
        assert build.get("args", {}).get("TRITON_IMAGE") == expected, f"{name}: {build.get('args')}"


def test_triton_image_has_the_projects_torch() -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if re.match(r"torch\s*==", p)).replace(" ", "")
    runs = " ".join(a for k, a in dockerfile_instructions(TRITON_DOCKERFILE) if k == "RUN")
    assert torch_pin in runs, f"triton/Dockerfile should install {torch_pin}, like pyproject.toml"
    assert "numpy<2" in runs


def test_triton_folder_is_not_a_package() -> None:
    # A package named `triton` would shadow the Triton compiler that torch imports.
    assert not (ROOT / "triton" / "__init__.py").exists()
