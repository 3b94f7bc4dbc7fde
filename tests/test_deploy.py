"""The deployment files, read the way Docker and Compose read them (no Docker engine runs here).

docker/compose.yaml must parse, give every service what a fleet needs (a healthy database before any
worker, a GPU reservation, shared volumes, a local-only dashboard) and hold no secret; the worker's
command must be one that `vadsearch launch` accepts; docker/Dockerfile must install what pyproject.toml
declares, with a CUDA build of torch that nothing replaces afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PASSWORD = "pw4test0nly"


# ----------------------------------------------------------------------------------- reading helpers


def env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR:?error}, and $$ for a literal $."""

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(value, text)


def compose(**overrides: str) -> dict:
    """The compose file as Compose resolves it with .env.example filled in (and `overrides`)."""
    env = {**env_example(), "POSTGRES_PASSWORD": PASSWORD, **overrides}
    return yaml.safe_load(interpolate((DOCKER / "compose.yaml").read_text(), env))


def raw_compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    steps, pending = [], ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        steps.append((instruction.upper(), " ".join(args.split())))
        pending = ""
    return steps


def pip_installs() -> list[tuple[int, list[str]]]:
    """(step index, pip arguments) of every `pip install` in a RUN step."""
    found = []
    for index, (instruction, args) in enumerate(dockerfile()):
        if instruction != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            if command[:2] == ["pip", "install"] or command[1:4] == ["-m", "pip", "install"]:
                found.append((index, command[command.index("install") + 1:]))
            command = []
    return found


def build_args() -> dict[str, str]:
    return dict(args.split("=", 1) for instruction, args in dockerfile() if instruction == "ARG" and "=" in args)


def dependency(name: str) -> str:
    return next(d for d in PYPROJECT["project"]["dependencies"] if re.match(rf"{name}\b", d))


# --------------------------------------------------------------------------------------- Dockerfile


def test_torch_comes_from_a_cuda_index_before_the_project_is_installed():
    installs = pip_installs()
    torch_steps = [(i, a) for i, a in installs if any(w.startswith("torch") for w in a)]
    assert len(torch_steps) == 1, "torch must be installed once, on its own, from the CUDA index"
    torch_index, torch_args = torch_steps[0]
    index_url = torch_args[torch_args.index("--index-url") + 1]
    index_url = index_url.replace("${TORCH_INDEX_URL}", build_args()["TORCH_INDEX_URL"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index_url), index_url
    assert dependency("torch") in torch_args, "the Dockerfile's torch range must be pyproject.toml's"

    project_steps = [i for i, a in installs if "." in a]
    assert len(project_steps) == 1, "the project itself is installed with `pip install .`"
    assert torch_index < project_steps[0]
    assert "-e" not in installs[[i for i, _ in installs].index(project_steps[0])][1], "a regular install"


def test_the_project_install_has_what_pyproject_needs():
    steps = dockerfile()
    project_step = next(i for i, a in pip_installs() if "." in a)
    copied = " ".join(args for instruction, args in steps[:project_step] if instruction == "COPY")
    assert "pyproject.toml" in copied
    assert PYPROJECT["project"]["readme"] in copied, "setuptools reads the readme while building"
    for package in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    later = " ".join(args for instruction, args in steps[project_step:] if instruction == "COPY")
    assert "studies" in later
    run = steps[project_step][1]
    assert "torch.version.cuda" in run, "the build must fail if pip replaced the CUDA build of torch"
    # The dashboard comes with the project, at the version pyproject.toml asks for, not a second pin here.
    assert any(d.startswith("optuna-dashboard") for d in PYPROJECT["project"]["dependencies"])
    assert "optuna-dashboard" not in run


def test_python_version_satisfies_requires_python():
    version = build_args()["PYTHON_VERSION"]
    base = next(args for instruction, args in dockerfile() if instruction == "FROM")
    assert base.startswith("python:${PYTHON_VERSION}-")
    assert Version(version) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_entrypoint_is_the_console_script_run_by_a_non_root_user():
    steps = dockerfile()
    entrypoint = next(args for instruction, args in steps if instruction == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == list(PYPROJECT["project"]["scripts"])
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [i for i, (ins, _) in enumerate(steps) if ins == "USER"][-1] < next(
        i for i, (ins, _) in enumerate(steps) if ins == "ENTRYPOINT")


def test_caches_point_at_volumes_and_nothing_of_the_data_is_copied_in():
    steps = dockerfile()
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for instruction, args in steps if instruction == "ENV")))
    volumes = yaml.safe_load(next(args for instruction, args in steps if instruction == "VOLUME"))
    for variable in ("VADSEARCH_CACHE", "HF_HOME"):
        assert any(env[variable].startswith(v + "/") for v in volumes), f"{variable} must live on a volume"
    mounted = {m.split(":")[1] for m in compose()["services"]["worker"]["volumes"]}
    assert set(volumes) <= mounted, "compose must mount every volume the image declares"
    copies = " ".join(args for instruction, args in steps if instruction in ("COPY", "ADD"))
    assert not re.search(r"emobank|\.csv|models|\.db\b|artifacts", copies, re.IGNORECASE)


def test_dockerignore_keeps_environments_history_and_results_out():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for pattern in (".venv*", ".git", "*.db", "vadsearch-artifacts", "docker/.env"):
        assert pattern in ignored


# --------------------------------------------------------------------------------------- compose.yaml


def test_compose_has_a_database_workers_and_a_dashboard():
    services = compose()["services"]
    assert set(services) == {"postgres", "worker", "dashboard"}
    assert set(compose()["volumes"]) >= {"pgdata", "artifacts", "cache"}


def test_postgres_is_persistent_and_healthchecked():
    db = compose()["services"]["postgres"]
    assert db["image"].startswith("postgres:")
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]
    test = db["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "pg_isready" in test[1]
    # Over TCP: the image's first start runs initdb's server on the Unix socket alone, which pg_isready
    # would take for the real one and start the clients against a database about to restart.
    assert "-h 127.0.0.1" in test[1]
    assert db["environment"]["POSTGRES_PASSWORD"] == PASSWORD  # from .env, by interpolation
    assert "max_connections=200" in db["command"]


def test_without_a_password_compose_refuses_to_start():
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        compose(POSTGRES_PASSWORD="")


@pytest.mark.parametrize("name", ["worker", "dashboard"])
def test_clients_wait_for_a_healthy_database_and_share_its_url(name):
    service = compose()["services"][name]
    assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    url = make_url(service["environment"]["VADSEARCH_STORAGE"])
    env = env_example()
    assert (url.drivername, url.host, url.username, url.password, url.database) == (
        "postgresql+psycopg", "postgres", env["POSTGRES_USER"], PASSWORD, env["POSTGRES_DB"])


def test_worker_reserves_gpus_and_can_be_scaled():
    worker = compose()["services"]["worker"]
    assert "container_name" not in worker, "`--scale worker=N` needs compose to name the containers"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert worker["stop_signal"] == "SIGINT", "Ctrl-C leaves running trials resumable at once"
    assert "artifacts:/artifacts" in worker["volumes"] and "cache:/cache" in worker["volumes"]


@pytest.mark.parametrize(("gpus", "per_gpu", "mps"), [("0", "2", "0"), ("0,1,2,3", "3", "1"), ("0,1", "auto", "0")])
def test_worker_command_runs_workers_per_gpu_through_vadsearch_launch(tmp_path, gpus, per_gpu, mps):
    import typer.main

    from vadsearch.cli import app

    worker = compose(GPUS=gpus, WORKERS_PER_GPU=per_gpu, MPS=mps)["services"]["worker"]
    script = worker["command"][0].replace("exec vadsearch", "printf '%s\\n'")  # the argv it would exec
    assert all(isinstance(v, str) for v in worker["environment"].values()), "quote them: YAML would read 0 as a number"
    env = {"PATH": os.environ["PATH"], **worker["environment"]}
    argv = subprocess.run([*worker["entrypoint"], script], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()
    assert argv[:2] == ["launch", "studies/quickstart.toml"]
    assert ("--mps" in argv) == (mps == "1") and argv.count("--mps") <= 1
    options = dict(zip(argv[2::2], argv[3::2])) if mps == "0" else dict(zip(argv[2:-1:2], argv[3:-1:2]))
    assert options["--workers-per-gpu"] == per_gpu and options["--gpus"] == gpus
    assert options["--artifacts"] == "/artifacts" and options["--log-dir"].startswith("/artifacts/logs/")
    launch = typer.main.get_command(app).commands["launch"]
    launch.make_context("launch", argv[1:])  # vadsearch accepts every option as given


def test_dashboard_serves_the_same_database_on_localhost_only():
    import typer.main

    from vadsearch.cli import app

    dashboard = compose()["services"]["dashboard"]
    assert "entrypoint" not in dashboard  # the image's `vadsearch`, which reads $VADSEARCH_STORAGE
    command = dashboard["command"]
    assert command[0] == "dashboard" and "--storage" not in command, "no password on a command line"
    typer.main.get_command(app).commands["dashboard"].make_context("dashboard", command[1:])
    options = dict(zip(command[1::2], command[2::2]))
    assert dashboard["ports"] == [f"127.0.0.1:8080:{options['--port']}"]
    assert "deploy" not in dashboard


def _settings(node, key=""):
    """Every (key, value) of the YAML, `KEY=value` list items included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _settings(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _settings(item, key)
    elif isinstance(node, str) and re.fullmatch(r"\w+=.*", node):
        yield tuple(node.split("=", 1))
    else:
        yield key, node


def test_no_secret_in_the_compose_file():
    reference = re.compile(r"\$\{\w+(:[-?][^}]*)?\}")
    for key, value in _settings(raw_compose()):
        if re.search(r"pass|secret|token|credential|api_?key", key, re.IGNORECASE):
            assert reference.fullmatch(str(value)), f"{key} must come from .env, not be written here"
    text = (DOCKER / "compose.yaml").read_text()
    for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", text):
        assert reference.fullmatch(password), f"a URL with a password literal: {password}"
    credentials = {v for k, v in env_example().items() if "PASSWORD" in k}
    assert credentials == {""}, ".env.example holds placeholders, not passwords"


def test_every_variable_of_the_compose_file_is_documented_in_env_example():
    used = {m.group(1) for m in _VARIABLE.finditer((DOCKER / "compose.yaml").read_text()) if m.group(1)}
    assert used - set(env_example()) == set()


def test_the_real_env_file_is_git_ignored():
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines()
    raw = raw_compose()
    assert raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
