"""docker-compose.yml and docker/*.Dockerfile agree with the repository (no Docker needed).

Checks what breaks a build or a deployment silently: COPY sources that do not exist or that
.dockerignore leaves out, compose services naming missing Dockerfiles or modules, Redis
without persistence or with eviction, ports, queues and environment that disagree.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
# Written by other changes in flight: checks that need them skip until they land.
IN_PROGRESS = {"workers", "service/main.py"}
OUR_SERVICES = ("api", "worker", "worker-cuda", "flower", "models")  # services that run smoothcert code


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def copy_sources(dockerfile: Path) -> list[str]:
    """Build-context paths that COPY/ADD take (COPY --from=<stage> reads no context)."""
    sources = []
    for word, args in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(args)
        flags = [p for p in parts if p.startswith("--")]
        paths = [p for p in parts if not p.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        assert len(paths) >= 2, f"{dockerfile.name}: {word} {args} needs a source and a destination"
        sources += paths[:-1]
    return sources


def glob_regex(pattern: str) -> re.Pattern:
    """Docker's path globs: `**/` any folders, `*` and `?` within one path element."""
    tokens = {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    parts = re.split(r"(\*\*/?|\*|\?)", pattern)
    return re.compile("".join(tokens.get(t, re.escape(t)) for t in parts) + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (or a folder above it) out of the build context.

    A simplification of Docker's matcher, enough for the patterns this repository uses."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:  # later lines win, `!` re-includes
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        if any(glob_regex(pattern).match(c) for c in candidates):
            ignored = not negate
    return ignored


def in_progress(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in IN_PROGRESS)


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(command: list[str], name: str) -> str:
    """The value of `--name value`, `--name=value` or `-n value` in an argument list."""
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


# ---------------------------------------------------------------- Dockerfiles


def test_the_three_dockerfiles_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"api.Dockerfile", "worker-cpu.Dockerfile", "worker-cuda.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing"
    for source in sources:
        assert not dockerignored(source), f"{dockerfile.name}: .dockerignore drops {source}"
    missing = [s for s in sources if not (ROOT / s).exists()]
    assert not [s for s in missing if not in_progress(s)], f"{dockerfile.name} copies {missing}"
    if missing:
        pytest.skip(f"{dockerfile.name} copies {missing}, not written yet")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_project_is_installed_without_letting_pip_choose_torch(dockerfile):
    runs = " ".join(args for word, args in instructions(dockerfile) if word == "RUN")
    assert "pip install --no-deps ." in runs
    assert re.search(r"requirements\.py --exclude [^&|;]*\btorch\b", runs)


def test_api_image_has_no_torch_and_workers_take_it_from_the_right_index():
    api = " ".join(a for w, a in instructions(ROOT / "docker/api.Dockerfile") if w == "RUN")
    assert "torch>=" not in api and "--exclude torch torchvision" in api
    for name, index in (("worker-cpu", "https://download.pytorch.org/whl/cpu"),
                        ("worker-cuda", "https://pypi.org/simple")):
        steps = instructions(ROOT / f"docker/{name}.Dockerfile")
        assert ("ARG", f"TORCH_INDEX_URL={index}") in steps
        assert any(w == "RUN" and '--index-url "${TORCH_INDEX_URL}" "torch>=' in a for w, a in steps)


def test_requirements_filter_leaves_out_exactly_what_is_asked():
    out = subprocess.run(
        [sys.executable, "docker/requirements.py", "--exclude", "torch", "torchvision",
         "scikit-learn"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    names = {re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() for d in out}
    assert not names & {"torch", "torchvision", "scikit-learn"}
    assert {"scipy", "numpy", "pillow", "fastapi", "celery", "redis"} <= names


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_services_and_their_dockerfiles_exist(services):
    assert {"redis", "api", "worker", "flower"} <= set(services)
    for name, service in services.items():
        if "build" not in service:
            assert "image" in service, f"{name} has neither build nor image"
            continue
        build = service["build"]
        context = COMPOSE.parent / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        if "target" in build:
            stages = {re.search(r"\bAS\s+(\S+)", a, re.I).group(1)
                      for w, a in instructions(dockerfile) if w == "FROM" and " AS " in a.upper()}
            assert build["target"] in stages, f"{name}: no stage {build['target']!r}"


def test_redis_persists_and_never_evicts(compose, services):
    from service.up import redis_command

    redis = services["redis"]
    command = command_of(redis)
    # fsync before every reply: an acknowledged memory commit survives a crash (service/durability.py).
    durable = {"--appendonly": "yes", "--appendfsync": "always", "--maxmemory-policy": "noeviction"}
    assert {name: option(command, name) for name in durable} == durable
    # `smoothcert up`, the benchmarks and the tests start the same server.
    local = redis_command("redis-server", 6379, Path("/data"))
    assert {name: option(local, name) for name in durable} == durable
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"]  # a named volume, not a bind
    assert "redis-cli" in healthcheck_text(redis)


def test_every_service_has_a_healthcheck_and_waits_for_a_healthy_redis(services):
    for name, service in services.items():
        if service.get("restart") != "no":  # one-shot jobs (models) run and exit
            assert "healthcheck" in service, name
        if name in OUR_SERVICES:
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_services_reach_the_compose_redis(services):
    redis_ports = container_ports(services["redis"]) or {6379}  # unpublished: the default
    for name in OUR_SERVICES:
        url = urlparse(environment(services[name])["SMOOTHCERT_REDIS_URL"])
        assert url.scheme == "redis" and url.hostname == "redis", name
        assert (url.port or 6379) in redis_ports, name


def test_api_command_ports_and_healthcheck_agree(services):
    api = services["api"]
    command = command_of(api)
    assert command[:2] == ["uvicorn", "service.main:app"]
    assert option(command, "--host") == "0.0.0.0"
    port = int(option(command, "--port"))
    assert container_ports(api) == {port}
    assert f"127.0.0.1:{port}/v2/health/live" in healthcheck_text(api)


def test_api_processes_agree_with_the_setting(services):
    from service.config import Settings

    # `smoothcert up` runs SMOOTHCERT_API_WORKERS processes; compose writes the default out.
    assert int(option(command_of(services["api"]), "--workers")) == Settings.model_fields["api_workers"].default


def test_api_stops_within_the_grace_period(services):
    from service.up import GRACEFUL_SHUTDOWN_SECONDS, api_command

    # Open long-polls are closed after this many seconds; Docker kills at 10 s. (The image's
    # CMD equals compose's command: test_compose_commands_match_the_images_defaults.)
    assert GRACEFUL_SHUTDOWN_SECONDS < 10
    for command in (command_of(services["api"]), api_command("127.0.0.1", 8000)):
        assert int(option(command, "--timeout-graceful-shutdown")) == GRACEFUL_SHUTDOWN_SECONDS


def test_api_module_exists():
    if not (ROOT / "service/main.py").is_file():
        pytest.skip("service/main.py is not written yet")
    assert "app" in (ROOT / "service/main.py").read_text()


def test_worker_commands_consume_the_queues_the_api_sends_to(services):
    from service.queue import worker_queues

    for name, device in (("worker", "cpu"), ("worker-cuda", "cuda")):
        command = command_of(services[name])
        assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"], name
        # Its device's queues and no other (service/queue.py), on that device.
        assert option(command, "-Q") == worker_queues(device), name
        assert environment(services[name])["SMOOTHCERT_DEVICE"] == device, name
        # threads of one process: their forward passes merge (smoothcert.batching)
        assert option(command, "--pool") == "threads" and int(option(command, "--concurrency")) >= 1, name
        assert "inspect ping" in healthcheck_text(services[name])
    gpu = services["worker-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["worker-cuda"]["profiles"] == ["cuda"]


INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR:-default}` with these variables (unset or empty: the default)."""
    return INTERPOLATION.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), value)


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def test_every_interpolated_variable_has_a_safe_default_and_is_in_env_example():
    text = COMPOSE.read_text()
    used = {m.group(1): m.group(0) for m in INTERPOLATION.finditer(text)}
    assert "$" not in INTERPOLATION.sub("", text.replace("$$", "")), "a $VAR without braces and a default"
    # Without a .env, compose runs with the defaults: an open API published on this machine only.
    assert all(":-" in expression for expression in used.values()), used
    assert set(used) == set(env_example()), "docker-compose.yml and .env.example name different variables"


def test_api_keys_and_queue_devices_come_from_env(services):
    from service.config import Settings

    api = environment(services["api"])
    # From .env, else the code's own default (no keys: an open API; the CPU queues).
    defaults = {"SMOOTHCERT_API_KEYS": "", "SMOOTHCERT_ADMIN_KEYS": "",
                "SMOOTHCERT_QUEUE_DEVICES": ",".join(Settings.model_fields["queue_devices"].default)}
    for name, default in defaults.items():
        assert api[name] == f"${{{name}:-{default}}}", name
    for name in env_example():
        assert not name.startswith("SMOOTHCERT_") or name.removeprefix("SMOOTHCERT_").lower() in Settings.model_fields
    # Keys are the API's alone: no other service is handed them.
    assert not [n for n in OUR_SERVICES if n != "api" and "SMOOTHCERT_API_KEYS" in environment(services[n])]
    published = [str(p) for p in services["api"]["ports"]]
    assert [interpolate(p, {}) for p in published] == ["127.0.0.1:8000:8000"]


@pytest.mark.parametrize("variables", [{}, env_example(), {"SMOOTHCERT_QUEUE_DEVICES": "cpu,cuda"},
                                       {"SMOOTHCERT_QUEUE_DEVICES": "cuda"}], ids=["defaults", ".env.example",
                                                                                    "cpu,cuda", "cuda"])
def test_the_declared_devices_have_workers(services, variables):
    """Every device type the API may route to has a compose worker on its queues; one that needs
    the cuda profile only when the variables ask for CUDA."""
    from service.queue import DEVICES, check_devices, device_queues

    declared = check_devices(interpolate(environment(services["api"])["SMOOTHCERT_QUEUE_DEVICES"], variables))
    workers = {environment(s)["SMOOTHCERT_DEVICE"]: s for n, s in services.items() if n.startswith("worker")}
    assert set(workers) == set(DEVICES)
    for device in declared:
        assert option(command_of(workers[device]), "-Q") == ",".join(device_queues(device))
    if "cuda" not in declared:
        assert "profiles" not in workers["cpu"]  # `docker compose up` alone serves every route


def test_redis_image_is_pinned(services):
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", services["redis"]["image"])


def test_worker_module_exists():
    if not (ROOT / "workers/celery_app.py").is_file():
        pytest.skip("workers/celery_app.py is not written yet")


def test_flower_port_and_healthcheck_agree(services):
    flower = services["flower"]
    command = command_of(flower)
    assert command[:4] == ["celery", "-A", "workers.celery_app", "flower"]
    port = int(option(command, "--port"))
    assert container_ports(flower) == {port}
    assert flower["ports"][0].startswith("127.0.0.1:")  # Flower has no login of its own
    assert f"127.0.0.1:{port}/healthcheck" in healthcheck_text(flower)


@pytest.mark.parametrize("name", ["api", "worker", "worker-cuda", "flower"])
def test_compose_commands_match_the_images_defaults(services, name):
    """`docker run` of an image alone does what compose does."""
    build = services[name]["build"]
    steps = instructions(COMPOSE.parent / build["dockerfile"])
    if "target" in build:  # the CMD of the target stage
        start = next(i for i, (w, a) in enumerate(steps)
                     if w == "FROM" and a.split()[-1] == build["target"])
        end = next((i for i, (w, _) in enumerate(steps) if i > start and w == "FROM"), len(steps))
        steps = steps[start:end]
    cmd = [a for w, a in steps if w == "CMD"][-1]
    assert json.loads(cmd) == command_of(services[name])
