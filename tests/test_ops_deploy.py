"""The deploy files read right: Dockerfile, Kubernetes manifests and the nginx config agree with the server."""
from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sfllm.config import ENV_PREFIX, FIELDS, ServerConfig, add_config_arguments, load_config
from sfllm.frontend.app import create_app
from sfllm.launcher import STOP_GRACE_S

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in lines if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def route_paths() -> set[str]:
    engine = SimpleNamespace(hello=SimpleNamespace(model_name="m", max_context_length=64), stats=None, connected=False, healthy=False)
    app = create_app(ServerConfig().frontend(), engine, tokenizer=None)  # type: ignore[arg-type]
    return set(app.openapi()["paths"])


def test_dockerfile_runs_sfllm_as_a_user_on_cuda_and_checks_health() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    assert dict(instructions)["FROM"].startswith("nvidia/cuda:")
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1] not in ("root", "0"), "the server runs as a non-root user"
    assert names.index("USER") < names.index("ENTRYPOINT")
    useradd = next(args for name, args in instructions if name == "RUN" and "useradd" in args)
    assert users[-1] in shlex.split(useradd)
    healthcheck = dict(instructions)["HEALTHCHECK"]
    assert "--start-period=" in healthcheck and " CMD " in f" {healthcheck} "
    assert re.search(r"http://127\.0\.0\.1:\$\{SFLLM_PORT\}/health", healthcheck)
    env = " ".join(args for name, args in instructions if name == "ENV")
    port = re.search(r"SFLLM_PORT=(\d+)", env).group(1)
    assert dict(instructions)["EXPOSE"] == port
    entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entrypoint[-2:] == ["sfllm", "launch"] and "tini" in entrypoint[0], "an init forwards signals to launch"
    assert dict(instructions)["STOPSIGNAL"] == "SIGTERM", "SIGTERM drains"
    copied = [args.split()[0] for name, args in instructions if name == "COPY"]
    assert {"sfllm", "kernels", "configs"} <= set(copied), "the profiles ship in the image"


def test_the_kernels_install_inside_sfllm_and_every_package_is_listed() -> None:
    """No top-level `kernels` package (Hugging Face's has that name): the folder installs as sfllm.kernels."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "sfllm").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"sfllm.kernels", "sfllm.configs"}
    assert setuptools["package-dir"] == {"sfllm.kernels": "kernels", "sfllm.configs": "configs"}


def test_an_install_ships_the_profiles_and_reads_them_away_from_a_checkout(tmp_path: Path) -> None:
    """What the Dockerfile does (its COPY lines, then `pip install .`), as a wheel: the profiles are in it as
    sfllm/configs, and `--config configs/h100.yaml` where no checkout is (the image's working folder) reads the
    installed h100 profile."""
    source = tmp_path / "src"
    source.mkdir()
    for name, kind in dockerfile_copies().items():
        (shutil.copytree if kind == "dir" else shutil.copy)(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("sfllm-*.whl"))) as wheel:
        wheel.extractall(tmp_path / "site")
        names = set(wheel.namelist())
    assert {f"sfllm/configs/{path.name}" for path in (REPO / "configs").glob("*.yaml")} <= names
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    read = subprocess.run(
        [sys.executable, "-c", "import argparse; from sfllm.config import load_config; "
                               "from sfllm.shipped_profiles import shipped_profile; "
                               "print(shipped_profile('configs/h100.yaml')); "
                               "print(load_config(argparse.Namespace(config='configs/h100.yaml')).model)"],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True,
        timeout=120)
    assert read.returncode == 0, read.stderr
    path, model = read.stdout.split()
    assert Path(path) == tmp_path / "site" / "sfllm" / "configs" / "h100.yaml"
    assert model == yaml.safe_load((REPO / "configs" / "h100.yaml").read_text())["model"]


def dockerfile_copies() -> dict[str, str]:
    """What the Dockerfile copies into its build folder: name -> "dir" or "file" (globs as they match here)."""
    copies = {}
    for name, args in dockerfile_instructions():
        if name == "COPY":
            for pattern in args.split()[:-1]:
                for path in REPO.glob(pattern):
                    copies[path.name] = "dir" if path.is_dir() else "file"
    return copies


def test_a_source_tree_on_the_path_finds_sfllm_kernels() -> None:
    """The GPU hosts run the tree from PYTHONPATH, installing nothing: the package itself finds the folder."""
    import sfllm
    spec = importlib.machinery.PathFinder.find_spec("sfllm.kernels", sfllm.__path__)
    assert spec is not None and Path(spec.origin) == REPO / "kernels" / "__init__.py"


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    assert not {"sfllm", "kernels", "configs", "pyproject.toml"} & ignored


def test_kubernetes_deployment_probes_existing_endpoints_and_asks_for_a_gpu(route_paths: set[str]) -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    by_kind = {document["kind"]: document for document in documents}
    assert set(by_kind) == {"Deployment", "Service"}
    pod = by_kind["Deployment"]["spec"]["template"]
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert by_kind["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert by_kind["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/health" and probes["readinessProbe"]["path"] == "/ready"
    for probe in probes.values():
        assert probe["path"] in route_paths and probe["port"] in port_names
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert all(name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].lower() in FIELDS for name in env), env
    assert int(env["SFLLM_PORT"]) == port_names["http"]
    assert "valueFrom" in next(item for item in container["env"] if item["name"] == "SFLLM_API_KEY")
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["SFLLM_DRAIN_TIMEOUT_S"]) + 5
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_nginx_config_balances_least_connections_and_streams() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    assert upstream is not None
    assert re.search(r"^\s*least_conn;", upstream.group(2), re.M)
    servers = re.findall(r"^\s*server\s+\S+\s+([^;]*);", upstream.group(2), re.M)
    assert len(servers) >= 2 and all("max_fails=" in s and "fail_timeout=" in s for s in servers)
    assert f"proxy_pass http://{upstream.group(1)};" in text
    assert "proxy_buffering off;" in text
    body_limit = re.search(r"client_max_body_size\s+(\d+)m;", text)
    assert int(body_limit.group(1)) << 20 == ServerConfig().max_request_body_bytes


def test_the_systemd_unit_signals_launch_alone_and_waits_for_the_drain() -> None:
    """deploy/sfllm.service: SIGTERM to launch alone (KillMode=mixed: launch stops its processes in order), a
    stop timeout past the drain and launch's grace for the frontends and the engine, SIGHUP as the reload (a
    rolling restart), and a command line the launch parser takes."""
    service: dict[str, str] = {}
    environment: dict[str, str] = {}
    for line in (DEPLOY / "sfllm.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            if key == "Environment":
                environment.update([value.split("=", 1)])
            service[key] = value
    assert service["KillMode"] == "mixed"
    assert float(service["TimeoutStopSec"]) >= float(environment["SFLLM_DRAIN_TIMEOUT_S"]) + 2 * STOP_GRACE_S
    assert service["ExecReload"].split()[-2:] == ["-HUP", "$MAINPID"]
    program, command, *args = shlex.split(service["ExecStart"])
    assert program.endswith("/sfllm") and command == "launch"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = load_config(parser.parse_args(args), environ=environment)
    assert config.drain_timeout_s == float(environment["SFLLM_DRAIN_TIMEOUT_S"]), "the unit's environment is read"
    assert config.model.endswith("Qwen3-8B") and config.port == 8081
