"""deploy/ (Kubernetes manifests composed with kustomize) agrees with Kubernetes and with the
repository, offline.

Each overlay is rendered by `render`, a kustomize of the fields deploy/ uses (resources,
namespace, JSON 6902 patches; any other field is refused rather than ignored), compared with
`kubectl kustomize` or `kustomize build` where one is installed. Every object then validates
against the Kubernetes schemas (kubernetes-validate, strict) or, for the custom resources,
against deploy/schemas/. The checks (`CHECKS`) hold what would break a deployment silently:
images and Dockerfiles, commands and modules, ports and probes, SMOOTHCERT_* names and
values, queues and what their workers can run, Redis's durability, scaling. Each check is
shown to fail on a broken copy (test_each_check_fails_on_a_broken_copy).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

from service import queue  # noqa: E402 (after the skips)
from service.config import Settings  # noqa: E402
from service.up import redis_command  # noqa: E402
from smoothcert.modes import DTYPES, FLAGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KSERVE = DEPLOY / "examples" / "kserve"
# The oldest Kubernetes the manifests promise (persistentVolumeClaimRetentionPolicy is beta,
# on by default, from 1.27) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
               ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-kserve-v1beta1.json"}
CLUSTER_SCOPED = {"Namespace"}
SECRET = "smoothcert-keys"
SETTINGS_MAP = "smoothcert-settings"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------- rendering


class Unsupported(Exception):
    """A kustomization uses something `render` does not implement."""


def _pointer(doc, path: str) -> tuple[object, str]:
    """The container and the last key of a JSON pointer (RFC 6901)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc, parts[-1]


def json_patch(doc: dict, ops: list[dict]) -> None:
    """RFC 6902 add, replace and remove, in place; anything else is Unsupported."""
    for op in ops:
        parent, key = _pointer(doc, op["path"])
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if op["op"] == "add":
                parent.insert(index, op["value"])
            elif op["op"] in ("replace", "remove"):
                parent[index]  # noqa: B018 (must exist)
                parent.pop(index) if op["op"] == "remove" else parent.__setitem__(index, op["value"])
            else:
                raise Unsupported(f"patch op {op['op']!r}")
        elif op["op"] == "add":
            parent[key] = op["value"]
        elif op["op"] in ("replace", "remove"):
            if key not in parent:
                raise KeyError(f"{op['op']} {op['path']}: no such member")
            parent.pop(key) if op["op"] == "remove" else parent.__setitem__(key, op["value"])
        else:
            raise Unsupported(f"patch op {op['op']!r}")


def render(folder: Path) -> list[dict]:
    """The objects `kustomize build folder` gives, for the fields deploy/ uses."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "namespace", "patches"}
    if unknown:
        raise Unsupported(f"{folder}: {sorted(unknown)} (extend tests/test_deploy.py's render)")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        target = patch.get("target", {})
        if set(patch) != {"target", "patch"} or not set(target) <= {"kind", "name"}:
            raise Unsupported(f"{folder}: patch {patch} (only target kind/name and an inline JSON 6902 patch)")
        matched = [d for d in docs if d["kind"] == target.get("kind", d["kind"])
                   and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])]
        if not matched:
            raise ValueError(f"{folder}: patch target {target} matches nothing")
        for doc in matched:
            json_patch(doc, yaml.safe_load(patch["patch"]))
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    names = [ident(d) for d in docs]
    if len(set(names)) != len(names):
        raise ValueError(f"{folder}: an object is defined twice: {sorted(names)}")
    return docs


def ident(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(DEPLOY / "overlays" / name) for name in OVERLAYS}


# ---------------------------------------------------------------- a rendered overlay


def template(doc: dict) -> dict:
    """The pod template's spec of a Deployment, StatefulSet or Job."""
    return doc["spec"]["template"]["spec"]


WORKLOADS = ("Deployment", "StatefulSet", "Job")


class PodSettings(Settings):
    """Settings from the values given and the code's defaults, not from this process's environment."""

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **sources):
        return (init_settings,)


class Stack:
    """One rendered overlay, with the look-ups the checks share."""

    def __init__(self, docs: list[dict]):
        self.docs = docs

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.all(kind) if d["metadata"]["name"] == name), None)

    @property
    def namespace(self) -> str:
        return self.get("ConfigMap", SETTINGS_MAP)["metadata"]["namespace"]

    @property
    def settings(self) -> dict[str, str]:
        return self.get("ConfigMap", SETTINGS_MAP)["data"]

    def setting(self, name: str):
        """A setting as the pods get it: the ConfigMap's value, else the code's default
        (ValueError for an invalid value)."""
        values = {k.removeprefix("SMOOTHCERT_").lower(): v for k, v in self.settings.items()}
        return getattr(PodSettings(**values), name)

    def containers(self) -> list[tuple[dict, dict]]:
        return [(d, c) for kind in WORKLOADS for d in self.all(kind) for c in template(d)["containers"]]

    def workers(self) -> list[tuple[dict, dict, str]]:
        """(Deployment, container, device type) of every Celery worker."""
        return [(d, c, env(c).get("SMOOTHCERT_DEVICE", "")) for d, c in self.containers()
                if c.get("command", [])[:4] == ["celery", "-A", "workers.celery_app", "worker"]]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def option(command: list[str], name: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def quantity(value) -> float:
    """A Kubernetes memory quantity (or Redis's 3gb), in bytes."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "kb": 2**10, "mb": 2**20, "gb": 2**30}  # Redis's kb, mb, gb are binary
    return float(number) * units[unit]


# ---------------------------------------------------------------- schemas


def crd_validator(doc: dict):
    schema = json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[doc["apiVersion"], doc["kind"]]).read_text())
    return jsonschema.Draft202012Validator(schema)


def schema_problems(doc: dict) -> list[str]:
    """What Kubernetes (strict) or the custom resource's schema refuses in `doc`."""
    name = "/".join(ident(doc))
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
        return [f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in crd_validator(doc).iter_errors(doc)]
    problems = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name} (Kubernetes {e.version}): {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {doc['apiVersion']} {doc['kind']} (a CRD: deploy/schemas)")
    return problems


def check_schemas(stack: Stack) -> list[str]:
    return [p for doc in stack.docs for p in schema_problems(doc)]


# ---------------------------------------------------------------- checks


def dockerfile_user(dockerfile: Path) -> int | None:
    found = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile.read_text())
    return int(found.group(1)) if found else None


def check_images(stack: Stack) -> list[str]:
    """smoothcert images name a Dockerfile of docker/ and the project's version, and the pod
    runs as that image's user; Redis is compose's pinned image."""
    problems = []
    redis_image = compose()["redis"]["image"]
    if not re.fullmatch(r"redis:\d+\.\d+\.\d+", redis_image):
        problems.append(f"docker-compose.yml's Redis image {redis_image} is not pinned to x.y.z")
    for doc, c in stack.containers():
        name, _, tag = c["image"].rpartition(":")
        where = f"{doc['metadata']['name']}/{c['name']}"
        if name.startswith("smoothcert-"):
            dockerfile = ROOT / "docker" / f"{name.removeprefix('smoothcert-')}.Dockerfile"
            if not dockerfile.is_file():
                problems.append(f"{where}: image {c['image']}: no {dockerfile.relative_to(ROOT)}")
                continue
            if tag != VERSION:
                problems.append(f"{where}: image {c['image']}: tag {tag!r} is not the project's version {VERSION}")
            user = template(doc).get("securityContext", {}).get("runAsUser")
            if user != dockerfile_user(dockerfile) or not template(doc)["securityContext"].get("runAsNonRoot"):
                problems.append(f"{where}: runs as {user}, not as {dockerfile.name}'s user")
        elif name == "redis":
            if c["image"] != redis_image:
                problems.append(f"{where}: {c['image']} is not docker-compose.yml's {redis_image}")
        else:
            problems.append(f"{where}: image {c['image']} is neither smoothcert's nor Redis")
    return problems


def module_exists(spec: str) -> bool:
    """`package.module[:attribute]` is a file of the repository (that assigns `attribute`)."""
    module, _, attribute = spec.partition(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    return path.is_file() and (not attribute or re.search(rf"^{attribute}\s*[:=]", path.read_text(), re.M) is not None)


def check_commands(stack: Stack) -> list[str]:
    """Commands name modules and paths that exist: the API as compose runs it, workers on
    their device's queues in that device's image as compose runs them, the register Job on
    bundles the API image carries."""
    problems = []
    services = compose()
    api_copies = " ".join(a for a in re.findall(r"^COPY (.+)$", (ROOT / "docker/api.Dockerfile").read_text(), re.M))
    for doc, c in stack.containers():
        command, where = c.get("command", []), f"{doc['metadata']['name']}/{c['name']}"
        if c["image"].startswith("smoothcert-api:") and command[:1] == ["uvicorn"]:
            if not module_exists(command[1]):
                problems.append(f"{where}: {command[1]} is not a module of the repository with that attribute")
            if command != services["api"]["command"]:
                problems.append(f"{where}: {command} is not docker-compose.yml's API command")
        elif c["image"].startswith("smoothcert-api:") and command[:2] == ["smoothcert", "register-model"]:
            for bundle in command[2:]:
                if not (ROOT / bundle / "model.json").is_file() or bundle.split("/")[0] not in api_copies.split():
                    problems.append(f"{where}: {bundle} is not a bundle the API image carries")
        elif command[:4] == ["celery", "-A", "workers.celery_app", "worker"]:
            device = env(c).get("SMOOTHCERT_DEVICE")
            if not module_exists("workers.celery_app"):
                problems.append(f"{where}: workers/celery_app.py does not exist")
            if device not in queue.DEVICES:
                problems.append(f"{where}: SMOOTHCERT_DEVICE={device!r} is not a device type with queues")
                continue
            if option(command, "-Q") != queue.worker_queues(device):
                problems.append(f"{where}: -Q {option(command, '-Q')} is not the {device} queues "
                                f"{queue.worker_queues(device)}")
            if not c["image"].startswith(f"smoothcert-worker-{device}:"):
                problems.append(f"{where}: a {device} worker in image {c['image']}")
            service = {"cpu": "worker", "cuda": "worker-cuda"}[device]
            if command != services[service]["command"]:
                problems.append(f"{where}: {command} is not docker-compose.yml's {service} command")
        elif c["image"].startswith("smoothcert-"):
            problems.append(f"{where}: unexpected command {command}")
    return problems


def named_ports(container: dict) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container.get("ports", [])}


def check_ports(stack: Stack) -> list[str]:
    """The API listens where its command says, Services select pods and reach their ports,
    and the Redis URL names the Redis Service and port."""
    problems = []
    for doc in stack.all("Deployment") + stack.all("StatefulSet"):
        labels = doc["spec"]["template"]["metadata"].get("labels", {})
        if not doc["spec"]["selector"]["matchLabels"].items() <= labels.items():
            problems.append(f"{doc['metadata']['name']}: its selector does not select its own pods")
    for _, c in stack.containers():
        listens = {int(option(c["command"], "--port"))} if c.get("command", [])[:1] == ["uvicorn"] else None
        if listens is not None and listens != set(named_ports(c).values()):
            problems.append(f"{c['name']}: listens on {option(c['command'], '--port')}, declares {named_ports(c)}")
    for service in stack.all("Service"):
        pods = [(d, c) for d, c in stack.containers()
                if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        if not pods:
            problems.append(f"Service {service['metadata']['name']} selects no pod")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in named_ports(c) or target in named_ports(c).values() for _, c in pods):
                problems.append(f"Service {service['metadata']['name']}: no selected pod has port {target}")
    url = urlparse(stack.settings["SMOOTHCERT_REDIS_URL"])
    redis = stack.get("Service", url.hostname or "")
    if redis is None or (url.port or 6379) not in [p["port"] for p in redis["spec"]["ports"]]:
        problems.append(f"SMOOTHCERT_REDIS_URL {url.geturl()} names no Service port of this deployment")
    return problems


def probes(container: dict) -> dict[str, dict]:
    return {k: container[k] for k in ("readinessProbe", "livenessProbe", "startupProbe") if k in container}


def check_probes(stack: Stack) -> list[str]:
    """The API's readiness is /v2/health/ready and its liveness /v2/health/live (routes that
    exist), on a port it declares; workers' liveness is Celery's ping, and outlasts the store's
    retries through a Redis restart."""
    from service.routes.health import router

    routes = {r.path for r in router.routes}
    problems = []
    for _, c in stack.containers():
        if c.get("command", [])[:1] == ["uvicorn"]:
            got = {k: (p.get("httpGet", {}).get("path"), p.get("httpGet", {}).get("port"))
                   for k, p in probes(c).items()}
            if got.get("readinessProbe", (None,))[0] != "/v2/health/ready":
                problems.append(f"{c['name']}: readiness {got.get('readinessProbe')} is not /v2/health/ready")
            if got.get("livenessProbe", (None,))[0] != "/v2/health/live":
                problems.append(f"{c['name']}: liveness {got.get('livenessProbe')} is not /v2/health/live")
            for kind, (path, port) in got.items():
                if path not in routes or port not in named_ports(c):
                    problems.append(f"{c['name']}: {kind} {path} on {port}: no such route or port")
    retry = stack.setting("redis_retry_seconds")
    for doc, c, _ in stack.workers():
        live = c.get("livenessProbe", {})
        command = " ".join(live.get("exec", {}).get("command", []))
        if "celery -A workers.celery_app inspect ping -d celery@$HOSTNAME" not in command:
            problems.append(f"{doc['metadata']['name']}: liveness {command!r} is not Celery's ping of this node")
        tolerated = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
        if tolerated <= retry:
            problems.append(f"{doc['metadata']['name']}: liveness gives up after {tolerated} s, within the "
                            f"{retry:g} s a worker rides out a Redis restart")
    return problems


def setting_names(stack: Stack) -> list[tuple[str, str]]:
    """(where, SMOOTHCERT_* name) of every setting the manifests set."""
    names = [(f"ConfigMap {SETTINGS_MAP}", k) for k in stack.settings]
    for doc, c in stack.containers():
        names += [(f"{doc['metadata']['name']}/{c['name']}", e["name"]) for e in c.get("env", [])]
    return names


def check_settings(stack: Stack) -> list[str]:
    """Every SMOOTHCERT_* name is a setting service/config.py reads, the ConfigMap's values
    are valid settings, keys come from the Secret, and every ConfigMap referenced exists."""
    problems = []
    for where, name in setting_names(stack):
        field = name.removeprefix("SMOOTHCERT_").lower()
        if not name.startswith("SMOOTHCERT_") or field not in Settings.model_fields:
            problems.append(f"{where}: {name} is not a setting of service/config.py")
    try:
        stack.setting("redis_url")
    except ValueError as exc:  # pydantic's ValidationError
        problems.append(f"ConfigMap {SETTINGS_MAP}: invalid settings: {exc}")
    for doc, c in stack.containers():
        for ref in c.get("envFrom", []):
            if stack.get("ConfigMap", ref.get("configMapRef", {}).get("name")) is None:
                problems.append(f"{doc['metadata']['name']}: envFrom {ref}: no such ConfigMap")
        for e in c.get("env", []):
            secret = e.get("valueFrom", {}).get("secretKeyRef")
            keys = e["name"] in ("SMOOTHCERT_API_KEYS", "SMOOTHCERT_ADMIN_KEYS")
            if keys and (secret is None or secret != {"name": SECRET, "key": e["name"]}):
                problems.append(f"{doc['metadata']['name']}: {e['name']} is not read from Secret {SECRET}")
    if any(k in stack.settings for k in ("SMOOTHCERT_API_KEYS", "SMOOTHCERT_ADMIN_KEYS")):
        problems.append(f"ConfigMap {SETTINGS_MAP} holds API keys: they belong in Secret {SECRET}")
    return problems


def check_redis(stack: Stack) -> list[str]:
    """One Redis, never two at once, durable as `smoothcert up` starts it, on a claim."""
    problems = []
    redises = [(d, c) for d, c in stack.containers() if c["image"].partition(":")[0] == "redis"]
    if len(redises) != 1:
        return [f"{len(redises)} Redis containers (one, exactly)"]
    doc, c = redises[0]
    single = doc["spec"].get("replicas") == 1 and (
        (doc["kind"] == "StatefulSet" and doc["spec"].get("updateStrategy", {}).get("type") == "OnDelete")
        or (doc["kind"] == "Deployment" and doc["spec"].get("strategy", {}).get("type") == "Recreate"))
    if not single:
        problems.append(f"{doc['kind']} {doc['metadata']['name']}: could run two Redis servers at once "
                        "(one replica, and OnDelete or Recreate)")
    args = c.get("command", []) + c.get("args", [])
    local = redis_command("redis-server", 6379, Path("/data"))
    for flag in ("--appendonly", "--appendfsync", "--maxmemory-policy"):
        if option(args, flag) != option(local, flag):
            problems.append(f"Redis {flag} {option(args, flag)}, not {option(local, flag)} (docs/deployment.md)")
    claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
    claims |= {v["name"] for v in template(doc).get("volumes", []) if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    if mounts.get(option(args, "--dir") or "/data") not in claims:
        problems.append("Redis's data directory is not on a PersistentVolumeClaim")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if limit is None or option(args, "--maxmemory") is None or \
            quantity(option(args, "--maxmemory")) >= quantity(limit):
        problems.append(f"Redis --maxmemory {option(args, '--maxmemory')} is not below its memory limit {limit}")
    return problems


def all_modes() -> list[str]:
    """Every valid numeric mode name."""
    from itertools import combinations

    flag_sets = [f for r in range(len(FLAGS) + 1) for f in combinations(FLAGS, r)
                 if not {"compile", "cuda_graphs"} <= set(f)]
    return ["+".join((dtype, *flags)) for dtype in DTYPES for flags in flag_sets]


def check_queues(stack: Stack) -> list[str]:
    """Every job the API accepts lands on a queue that a worker able to run it consumes:
    SMOOTHCERT_QUEUE_DEVICES names only devices this overlay runs workers for, and no route
    (kind × numeric mode) leads to a queue without such a consumer. GPU workers ask for a GPU."""
    problems = []
    declared = queue.check_devices(stack.settings.get("SMOOTHCERT_QUEUE_DEVICES", "cpu"))
    consumers: dict[str, set[str]] = {}
    for doc, c, device in stack.workers():
        for name in (option(c["command"], "-Q") or "").split(","):
            consumers.setdefault(name, set()).add(device)
        gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
        if (device == "cuda") != (gpus is not None and int(gpus) >= 1):
            problems.append(f"{doc['metadata']['name']}: a {device} worker with nvidia.com/gpu {gpus}")
    for device in declared:
        if not all(device in consumers.get(q, ()) for q in queue.device_queues(device)):
            problems.append(f"SMOOTHCERT_QUEUE_DEVICES names {device}, and no {device} worker consumes its queues")
    for kind in queue.TASK_OF_KIND:
        for mode in all_modes():
            try:
                target = queue.route(kind, mode, declared)
            except queue.NoQueue:
                continue
            if not any(queue.can_run(device, mode) for device in consumers.get(target, ())):
                problems.append(f"{kind} jobs in {mode} go to {target}, where no worker can run them")
                break  # one mode per kind says enough
    return problems


def check_scaling(stack: Stack) -> list[str]:
    """One ScaledObject per worker Deployment, a Redis list trigger on each of its queues at
    the Redis Service's full name and the URL's database, some worker always up (the API is
    ready only while one beats), and room for running jobs to end on a scale-down."""
    problems = []
    url = urlparse(stack.settings["SMOOTHCERT_REDIS_URL"])
    address = f"{url.hostname}.{stack.namespace}.svc.cluster.local:{url.port or 6379}"
    database = (url.path.strip("/") or "0")
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in stack.all("ScaledObject")}
    time_limit = stack.setting("job_time_limit_seconds")
    always_up = False
    for doc, c, _ in stack.workers():
        name = doc["metadata"]["name"]
        grace = template(doc).get("terminationGracePeriodSeconds", 30)
        if grace < time_limit:
            problems.append(f"{name}: a scale-down kills running jobs after {grace} s (job limit {time_limit} s)")
        so = scaled.pop(name, None)
        if so is None:
            problems.append(f"{name}: no ScaledObject")
            continue
        if "replicas" in doc["spec"]:
            problems.append(f"{name}: sets replicas, which KEDA owns")
        spec = so["spec"]
        if spec["scaleTargetRef"].get("kind", "Deployment") != doc["kind"]:
            problems.append(f"ScaledObject {so['metadata']['name']} targets a {spec['scaleTargetRef'].get('kind')}")
        lists = []
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            lists.append(meta.get("listName"))
            if trigger["type"] != "redis" or meta.get("address") != address \
                    or meta.get("databaseIndex", "0") != database:
                problems.append(f"ScaledObject {so['metadata']['name']}: trigger {trigger.get('name')} reads "
                                f"{trigger['type']} {meta.get('address')} db {meta.get('databaseIndex')}, not "
                                f"redis {address} db {database}")
        if sorted(lists) != sorted(option(c["command"], "-Q").split(",")):
            problems.append(f"ScaledObject {so['metadata']['name']}: lists {lists} are not {name}'s queues")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if low > high:
            problems.append(f"ScaledObject {so['metadata']['name']}: minReplicaCount {low} > maxReplicaCount {high}")
        always_up |= low >= 1
    problems += [f"ScaledObject {s['metadata']['name']} targets no worker Deployment" for s in scaled.values()]
    if not always_up:
        problems.append("every worker may scale to zero: the API would then never be ready, so never scaled up")
    return problems


CHECKS: dict[str, Callable[[Stack], list[str]]] = {
    "schemas": check_schemas, "images": check_images, "commands": check_commands, "ports": check_ports,
    "probes": check_probes, "settings": check_settings, "redis": check_redis, "queues": check_queues,
    "scaling": check_scaling,
}


# ---------------------------------------------------------------- the tests


def test_every_overlay_is_found():
    assert {"cpu", "gpu", "cpu-gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_agrees_with_kustomize(overlay, rendered):
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed; the checks use our own rendering")
    out = subprocess.run([*command, str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=ident)
    assert sorted(rendered[overlay], key=ident) == theirs


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes(overlay, check, rendered):
    assert CHECKS[check](Stack(copy.deepcopy(rendered[overlay]))) == []


def test_each_overlay_deploys_what_it_says(rendered):
    devices = {name: sorted(device for _, _, device in Stack(docs).workers()) for name, docs in rendered.items()}
    assert devices == {"cpu": ["cpu"], "gpu": ["cuda"], "cpu-gpu": ["cpu", "cuda"]}
    declared = {name: Stack(docs).settings["SMOOTHCERT_QUEUE_DEVICES"] for name, docs in rendered.items()}
    assert declared == {"cpu": "cpu", "gpu": "cuda", "cpu-gpu": "cpu,cuda"}
    # Where only CPU workers consume, a CUDA-only request is refused at submit, never queued.
    with pytest.raises(queue.NoQueue, match="SMOOTHCERT_QUEUE_DEVICES"):
        queue.route("certification", "fp16", queue.check_devices(declared["cpu"]))
    assert queue.route("certification", "fp16", queue.check_devices(declared["cpu-gpu"])) == "certifications-cuda"
    assert queue.route("certification", "fp32", queue.check_devices(declared["cpu-gpu"])) == "certifications"


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def container(docs: list[dict], name: str) -> dict:
    """The first container of the workload `name`."""
    return template(next(d for d in docs if d["kind"] in WORKLOADS and d["metadata"]["name"] == name))["containers"][0]


def change(kind: str, name: str, path: str, value=None, op: str = "replace") -> Callable[[list[dict]], None]:
    """A JSON 6902 operation on the object `kind`/`name`."""
    def apply(docs: list[dict]) -> None:
        json_patch(find(docs, kind, name), [{"op": op, "path": path, "value": value}])
    return apply


def both(*changes: Callable[[list[dict]], None]) -> Callable[[list[dict]], None]:
    return lambda docs: [c(docs) for c in changes]


def drop(kind: str, name: str) -> Callable[[list[dict]], None]:
    return lambda docs: docs.remove(find(docs, kind, name))


API, CPU, GPU, REDIS, JOB = "smoothcert-api", "smoothcert-worker-cpu", "smoothcert-worker-cuda", "redis", \
    "smoothcert-register-models"
C = "/spec/template/spec/containers/0"
POD = "/spec/template/spec"
# (check, what is broken, how) on a copy of overlays/cpu-gpu: each must be reported.
BREAKAGES = [
    ("schemas", "a Deployment's replicas as a string", change("Deployment", API, "/spec/replicas", "two")),
    ("schemas", "an unknown container field", change("Deployment", API, f"{C}/imagePullPolice", "Always", "add")),
    ("schemas", "a misspelt KEDA list field",
     change("ScaledObject", CPU, "/spec/triggers/0/metadata", {"address": "redis:6379", "listname": "x"})),
    ("schemas", "a negative KEDA minimum", change("ScaledObject", GPU, "/spec/minReplicaCount", -1)),
    ("images", "a Dockerfile that does not exist",
     change("Deployment", CPU, f"{C}/image", "smoothcert-worker-tpu:0.1.0")),
    ("images", "an unpinned tag", change("Deployment", API, f"{C}/image", "smoothcert-api:latest")),
    ("images", "another Redis than compose's", change("StatefulSet", REDIS, f"{C}/image", "redis:7")),
    ("images", "root instead of the image's user", change("Deployment", API, f"{POD}/securityContext/runAsUser", 0)),
    ("commands", "a module that does not exist", change("Deployment", API, f"{C}/command/1", "service.mian:app")),
    ("commands", "a CPU worker on a CUDA queue",
     change("Deployment", CPU, f"{C}/command/6", "certifications,certifications-cuda")),
    ("commands", "a bundle that does not exist", change("Job", JOB, f"{C}/command/2", "models/digitz")),
    ("commands", "a GPU worker in the CPU image",
     change("Deployment", GPU, f"{C}/image", "smoothcert-worker-cpu:0.1.0")),
    ("ports", "the API declaring another port than it listens on",
     change("Deployment", API, f"{C}/ports/0/containerPort", 8080)),
    ("ports", "a Service to a port no pod has", change("Service", API, "/spec/ports/0/targetPort", "web")),
    ("ports", "a Redis URL to no Service",
     change("ConfigMap", SETTINGS_MAP, "/data/SMOOTHCERT_REDIS_URL", "redis://cache:6379/0")),
    ("probes", "readiness on a route that does not exist",
     change("Deployment", API, f"{C}/readinessProbe/httpGet/path", "/v2/health/readyz")),
    ("probes", "liveness on the readiness route (it needs Redis)",
     change("Deployment", API, f"{C}/livenessProbe/httpGet/path", "/v2/health/ready")),
    ("probes", "a worker liveness a Redis restart fails",
     change("Deployment", CPU, f"{C}/livenessProbe/failureThreshold", 1)),
    ("settings", "a misspelt setting",
     change("ConfigMap", SETTINGS_MAP, "/data/SMOOTHCERT_QUEUE_DEVICE", "cpu", "add")),
    ("settings", "an invalid value", change("ConfigMap", SETTINGS_MAP, "/data/SMOOTHCERT_QUEUE_DEVICES", "tpu")),
    ("settings", "keys not from the Secret",
     change("Deployment", API, f"{C}/env/0/valueFrom/secretKeyRef/name", "keys")),
    ("redis", "appendfsync everysec", change("StatefulSet", REDIS, f"{C}/args/4", "everysec")),
    ("redis", "two replicas", change("StatefulSet", REDIS, "/spec/replicas", 2)),
    ("redis", "a rolling update", change("StatefulSet", REDIS, "/spec/updateStrategy/type", "RollingUpdate")),
    ("redis", "maxmemory above the memory limit", change("StatefulSet", REDIS, f"{C}/args/8", "8gb")),
    ("redis", "data in the container, not on the claim",
     change("StatefulSet", REDIS, f"{C}/volumeMounts/0/mountPath", "/d")),
    ("queues", "CUDA declared with no GPU worker", drop("Deployment", GPU)),
    ("queues", "the CUDA queues consumed by a CPU worker only",
     both(change("Deployment", GPU, f"{C}/env/0/value", "cpu"),
          change("Deployment", GPU, f"{C}/resources/limits", {"memory": "1Gi"}))),
    ("queues", "a GPU worker without a GPU", change("Deployment", GPU, f"{C}/resources/limits", {"memory": "1Gi"})),
    ("scaling", "a trigger on a list no worker reads",
     change("ScaledObject", CPU, "/spec/triggers/0/metadata/listName", "certification")),
    ("scaling", "a trigger reading Redis in another namespace",
     change("ScaledObject", GPU, "/spec/triggers/1/metadata/address", "redis.default.svc.cluster.local:6379")),
    ("scaling", "every worker able to scale to zero", change("ScaledObject", CPU, "/spec/minReplicaCount", 0)),
    ("scaling", "running jobs killed on a scale-down",
     change("Deployment", GPU, f"{POD}/terminationGracePeriodSeconds", 60)),
    ("scaling", "a worker KEDA does not scale", drop("ScaledObject", GPU)),
]


@pytest.mark.parametrize(("check", "broken", "mutate"), BREAKAGES, ids=[f"{c}: {b}" for c, b, _ in BREAKAGES])
def test_each_check_fails_on_a_broken_copy(check, broken, mutate, rendered):
    docs = copy.deepcopy(rendered["cpu-gpu"])
    mutate(docs)
    assert CHECKS[check](Stack(docs)), f"{check} did not notice {broken}"


def test_every_check_is_shown_to_fail():
    assert {c for c, _, _ in BREAKAGES} == set(CHECKS)


def test_render_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: '1'}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\nimages: [{name: a, newTag: '2'}]\n")
    with pytest.raises(Unsupported, match="images"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [a.yaml]\npatches:\n- target: {kind: ConfigMap, name: b}\n  patch: '[]'\n")
    with pytest.raises(ValueError, match="matches nothing"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [a.yaml]\npatches:\n- target: {kind: ConfigMap, name: a}\n"
        "  patch: '[{op: replace, path: /data/y, value: \"2\"}]'\n")
    with pytest.raises(KeyError):
        render(tmp_path)


# ---------------------------------------------------------------- Secret, compose, KServe


def test_the_readme_creates_the_secret_the_api_reads(rendered):
    readme = (DEPLOY / "README.md").read_text()
    keys = {e["valueFrom"]["secretKeyRef"]["key"] for docs in rendered.values() for d, c in Stack(docs).containers()
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert keys == {"SMOOTHCERT_API_KEYS", "SMOOTHCERT_ADMIN_KEYS"}
    command = re.search(rf"create secret generic {SECRET}(.*?)\n\s*```", readme, re.S)
    assert command and all(f"--from-literal={k}=" in command.group(1) for k in keys)


def test_the_kserve_example():
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    assert schema_problems(isvc) == []
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"  # the Open Inference Protocol
    bundle = json.loads((KSERVE / "bundle" / "model.json").read_text())
    assert bundle["kind"] == "remote"
    assert {"endpoint", "model", "version", "input", "output", "datatype"} <= set(bundle["remote"])
    assert example_problems(isvc, bundle) == []
    readme = (KSERVE / "README.md").read_text()
    assert "docs/bundles.md" in readme and "bundle/model.json" in readme


def example_problems(isvc: dict, bundle: dict) -> list[str]:
    """The bundle names the InferenceService's in-cluster address and is a valid model.json."""
    problems = []
    host = urlparse(bundle["remote"]["endpoint"]).hostname
    expected = f"{isvc['metadata']['name']}-predictor.{isvc['metadata']['namespace']}.svc.cluster.local"
    if host != expected:
        problems.append(f"the bundle calls {host}, not the InferenceService at {expected}")
    from smoothcert.manifest import BundleError, ModelSpec

    try:
        ModelSpec.from_json(bundle)
    except BundleError as exc:
        problems.append(f"model.json: {exc}")
    return problems


def test_kserve_checks_fail_on_broken_copies():
    isvc = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    bundle = json.loads((KSERVE / "bundle" / "model.json").read_text())
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    assert schema_problems(broken)
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["modle"] = broken["spec"]["predictor"].pop("model")
    assert schema_problems(broken)
    moved = copy.deepcopy(bundle)
    moved["remote"]["endpoint"] = "http://digit-predictor.models.svc.cluster.local"
    assert example_problems(isvc, moved)
    invalid = copy.deepcopy(bundle)
    invalid["remote"]["datatype"] = "BYTES"
    assert example_problems(isvc, invalid)


def test_compose_and_kubernetes_run_the_same_redis(rendered):
    redis = container(rendered["cpu"], "redis")
    assert redis["image"] == compose()["redis"]["image"]
    assert shlex.join(compose()["redis"]["command"]) in shlex.join(redis["args"])
