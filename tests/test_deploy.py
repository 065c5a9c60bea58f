"""The files in deploy/ are right without running a container: they parse, set only variables the
product reads (and documents in .env.example), and run only real `intergiro-receiver` commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.cli import build_parser
from receiver.metrics.exporter import DEPLOYMENT_GAUGES, DESTINATION_GAUGES
from receiver.metrics.receiver_registry import ReceiverMetrics
from receiver.metrics.shared import SHARED_METRICS
from receiver.settings import SETTING_NAMES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE = "intergiro-receiver"
# Set by the image for Python itself, not settings of the product.
PYTHON_VARIABLES = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def documented_variables() -> set[str]:
    return {m[1] for m in re.finditer(r"^([A-Z][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M)}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return instructions


def exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> list[dict[str, Any]]:
    manifests = sorted(p for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    return [d for p in manifests for d in docs(p)]


def app_containers() -> list[dict[str, Any]]:
    """Every container and init container running the product's image."""
    return [
        c
        for o in k8s_objects()
        if o["kind"] == "Deployment"
        for c in o["spec"]["template"]["spec"].get("initContainers", [])
        + o["spec"]["template"]["spec"]["containers"]
        if c["image"].split(":")[0] == IMAGE
    ]


def deployment(name: str) -> dict[str, Any]:
    [found] = [o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == name]
    return found


def secret_example() -> dict[str, str]:
    lines = (DEPLOY / "k8s" / "secrets.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_app_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if s.get("image", "").split(":")[0] == IMAGE}


def assert_real_command(argv: list[str]) -> None:
    assert argv[0] == "intergiro-receiver", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"not a command intergiro-receiver knows: {shlex.join(argv)}")


def set_variables() -> dict[str, set[str]]:
    """Every environment variable a deploy file sets for the product's processes, by file."""
    found: dict[str, set[str]] = {}
    env = {a.split("=", 1)[0] for i, args in dockerfile() if i == "ENV" for a in shlex.split(args)}
    found["Dockerfile"] = env - PYTHON_VARIABLES
    found["compose.yaml"] = {v for s in compose_app_services().values() for v in s.get("environment", {})}
    k8s: set[str] = set()
    for o in k8s_objects():
        if o["kind"] == "ConfigMap":
            k8s |= set(o["data"])
    k8s |= set(secret_example())
    k8s |= {e["name"] for c in app_containers() for e in c.get("env", [])}
    found["k8s"] = k8s
    return found


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_in_deploy_parses(path: Path) -> None:
    assert docs(path)


def test_every_kubernetes_object_names_its_kind_and_itself() -> None:
    kinds = sorted(o["kind"] for o in k8s_objects())
    assert kinds == sorted(["ConfigMap", "Deployment", "Deployment", "Deployment", "Deployment", "Service", "Service",
                            "PodDisruptionBudget", "PodDisruptionBudget", "HorizontalPodAutoscaler"])  # fmt: skip
    assert all(o["apiVersion"] and o["metadata"]["name"] for o in k8s_objects())
    listed = docs(DEPLOY / "k8s" / "kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_the_image_is_slim_python_runs_as_a_user_checks_healthz_and_enters_the_cli() -> None:
    instructions = dockerfile()
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    assert {i for i, _ in instructions} <= known
    bases = [args.split()[0] for i, args in instructions if i == "FROM"]
    assert all(re.fullmatch(r"python:3\.(1[1-9])-slim", b) for b in bases), bases
    user = [args for i, args in instructions if i == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert any(
        "pip install" in args and args.rstrip().endswith(" .") for i, args in instructions if i == "RUN"
    )
    [health] = [args for i, args in instructions if i == "HEALTHCHECK"]
    assert "/healthz" in health
    [entrypoint] = [exec_form(args) for i, args in instructions if i == "ENTRYPOINT"]
    [cmd] = [exec_form(args) for i, args in instructions if i == "CMD"]
    assert entrypoint == ["intergiro-receiver"]
    assert_real_command(entrypoint + cmd)


def test_every_command_line_in_compose_and_kubernetes_is_a_real_cli_command() -> None:
    commands = [["intergiro-receiver", *s["command"]] for s in compose_app_services().values()]
    commands += [c.get("command", ["intergiro-receiver"]) + c.get("args", []) for c in app_containers()]
    # compose: receiver, worker, ops; k8s: receiver, worker, reconcile, ops, two checks
    assert len(commands) == 9
    for argv in commands:
        assert_real_command(argv)


def test_every_variable_the_deploy_files_set_is_a_setting_documented_in_env_example() -> None:
    documented = documented_variables()
    for where, variables in set_variables().items():
        assert variables, where
        assert variables <= set(SETTING_NAMES), (where, variables - set(SETTING_NAMES))
        assert variables <= documented, (where, variables - documented)


def test_env_example_documents_exactly_the_settings() -> None:
    assert documented_variables() == set(SETTING_NAMES)


def test_compose_runs_redis_with_the_durable_config_and_a_password_a_receiver_two_workers_and_rq_dashboard() -> (
    None
):
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "redis-server /usr/local/etc/redis/redis.conf --requirepass" in redis_command
    assert "REDIS_PASSWORD" in redis_command
    assert "./redis.conf:/usr/local/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "/healthz" in " ".join(services["worker"]["healthcheck"]["test"])
    assert services["worker"]["environment"]["WORKER_METRICS_PORT"] == "8082"
    assert services["receiver"]["command"] == ["serve"]
    # REDIS_URL, with the password, comes from .env: no service sets one without it
    assert all("REDIS_URL" not in s.get("environment", {}) for s in services.values())


def test_docker_compose_config_accepts_the_compose_file(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode
    ):
        pytest.skip("docker compose is not installed: compose.yaml checked by the YAML tests only")
    answer = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr


def redis_conf() -> dict[str, str]:
    lines = [line.split(None, 1) for line in (DEPLOY / "redis.conf").read_text().splitlines()]
    return {words[0]: words[1] for words in lines if words and not words[0].startswith("#")}


def test_redis_conf_keeps_what_was_acknowledged_and_never_evicts() -> None:
    conf = redis_conf()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("always", "everysec")
    assert conf["maxmemory-policy"] == "noeviction"


def test_redis_conf_sets_a_memory_limit_protected_mode_and_no_password_of_its_own() -> None:
    conf = redis_conf()
    assert conf["maxmemory"] not in ("0", "")
    assert conf["protected-mode"] == "yes"
    assert "requirepass" not in conf  # given at start (compose: from .env), never committed


def kustomize_build() -> list[dict[str, Any]]:
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the kustomization is not built")
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, check=False, timeout=60
    )
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


def test_the_kustomize_build_holds_no_secret_and_no_change_me_value() -> None:
    objects = kustomize_build()
    assert "Secret" not in {o["kind"] for o in objects}
    assert "CHANGE-ME" not in yaml.safe_dump_all(objects)
    assert {o["metadata"]["namespace"] for o in objects} == {"intergiro"}


def test_every_manifest_passes_the_kubernetes_schema() -> None:
    import kubernetes_validate

    for o in k8s_objects():
        kubernetes_validate.validate(o, "1.30.0", strict=True)


def test_the_receiver_and_worker_pods_run_check_first() -> None:
    for name in ("intergiro-receiver", "intergiro-worker"):
        spec = deployment(name)["spec"]["template"]["spec"]
        [init] = spec["initContainers"]
        assert init["args"] == ["check"]
        assert init["envFrom"] == spec["containers"][0]["envFrom"]


def test_the_worker_is_alive_while_its_rq_heartbeat_is_and_scraped_on_its_metrics_port() -> None:
    template = deployment("intergiro-worker")["spec"]["template"]
    [container] = template["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert {e["name"]: e["value"] for e in container["env"]}["WORKER_METRICS_PORT"] == str(port)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_a_reconcile_deployment_runs_reconcile_every_interval() -> None:
    spec = deployment("intergiro-reconcile")["spec"]
    assert spec["replicas"] == 1
    assert spec["template"]["spec"]["containers"][0]["args"] == ["reconcile", "--every"]
    [configmap] = [o for o in k8s_objects() if o["kind"] == "ConfigMap"]
    assert int(configmap["data"]["RECONCILE_INTERVAL_SECONDS"]) > 0
    assert set(secret_example()) >= {"REDIS_URL", "INTERGIRO_API_KEY"}


def test_the_receiver_is_ready_on_readyz_alive_on_healthz_and_behind_the_service() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    deployment = objects["Deployment", "intergiro-receiver"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert {e["name"]: e["value"] for e in container["env"]}["RECEIVER_PORT"] == str(port)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = objects["Service", "intergiro-receiver"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    for kind in ("PodDisruptionBudget", "HorizontalPodAutoscaler"):
        for (k, _), o in objects.items():
            if k == kind and "selector" in o["spec"]:
                assert any(o["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
                           for (dk, _), d in objects.items() if dk == "Deployment")  # fmt: skip
            if k == kind and "scaleTargetRef" in o["spec"]:
                assert ("Deployment", o["spec"]["scaleTargetRef"]["name"]) in objects
    for o in objects.values():
        if o["kind"] == "Deployment":
            assert o["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_ops_console_runs_in_compose_and_kubernetes_internal_only_with_the_token_from_the_secret() -> (
    None
):
    service = compose()["services"]["ops"]
    assert service["command"] == ["ops"]
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])  # the host's loopback only
    assert (
        service["environment"]["OPS_PORT"]
        != compose()["services"]["receiver"]["environment"]["RECEIVER_PORT"]
    )
    objects = {(o["kind"], o["metadata"]["name"]): o for o in k8s_objects()}
    [container] = objects["Deployment", "intergiro-ops"]["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["ops"]
    assert {"secretRef": {"name": "intergiro-receiver"}} in container["envFrom"]
    assert ("Secret", "intergiro-receiver") not in objects  # made by the operator (secrets.env.example)
    example = (DEPLOY / "k8s" / "secrets.env.example").read_text()
    assert "\nOPS_TOKEN=" in example
    ops_service = objects["Service", "intergiro-ops"]
    assert ops_service["spec"].get("type", "ClusterIP") == "ClusterIP"
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert {e["name"]: e["value"] for e in container["env"]}["OPS_PORT"] == str(port)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def served_metric_names() -> set[str]:
    names = {m.name for m in ReceiverMetrics().registry.collect()}
    per_destination = {*DESTINATION_GAUGES, "intergiro_destination_state"}
    return (
        names | {n + "_total" for n in names} | set(SHARED_METRICS) | set(DEPLOYMENT_GAUGES) | per_destination
    )


def test_the_alerts_watch_dead_letters_503s_and_workers_through_metrics_the_receiver_serves() -> None:
    [group] = docs(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"]
    rules = {r["alert"]: r for r in group["rules"]}
    assert all(r["expr"] and r["for"] and r["labels"]["severity"] for r in rules.values())
    assert "intergiro_dead_letter_depth" in rules["IntergiroDeadLetterGrowing"]["expr"]
    assert (
        'intergiro_callbacks_total{outcome="rejected_503"}' in rules["IntergiroCallbacksUnavailable"]["expr"]
    )
    assert "intergiro_workers_alive" in rules["IntergiroNoWorkerAlive"]["expr"]
    used = {m for r in rules.values() for m in re.findall(r"\bintergiro_[a-z_]+", r["expr"])}
    assert used <= served_metric_names(), used - served_metric_names()


async def test_the_receiver_counts_the_workers_alive_and_not_one_that_died_unregistered(
    receiver: Any, sync_redis: Any, settings: Any
) -> None:
    from rq import Queue, Worker

    queue = Queue(settings.queue_name, connection=sync_redis)
    for name in ("alive-1", "alive-2", "died"):
        Worker([queue], name=name, connection=sync_redis).register_birth()
    sync_redis.delete("rq:worker:died")  # its heartbeat expired: it was killed without a goodbye
    text = await (await receiver.get("/metrics")).text()
    assert "intergiro_workers_alive 2.0" in text.splitlines()


def test_a_real_redis_starts_with_redis_conf_and_refuses_clients_without_the_password(tmp_path: Path) -> None:
    import subprocess

    import redis

    from tests.processes import free_port, redis_binary, wait_for_redis

    port = free_port()
    text = (DEPLOY / "redis.conf").read_text()
    text = re.sub(r"^dir .*$", f"dir {tmp_path}", text, flags=re.M)
    text = re.sub(r"^port .*$", f"port {port}", text, flags=re.M)
    (tmp_path / "redis.conf").write_text(text)
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [redis_binary(), str(tmp_path / "redis.conf"), "--requirepass", "the-password"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        client = redis.Redis(port=port, password="the-password", socket_connect_timeout=0.5)
        wait_for_redis(client, server, log)
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1024**3
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        client.close()
    finally:
        server.terminate()
        server.wait(10)


def test_compose_pins_rq_dashboard_to_the_version_the_docs_were_tried_with_and_names_the_ops_token() -> None:
    tried = re.search(
        r"Tried with rq-dashboard (\d+\.\d+\.\d+)", (ROOT / "docs" / "operations.md").read_text()
    )
    assert tried is not None
    dashboard = " ".join(compose()["services"]["rq-dashboard"]["command"])
    assert f"rq-dashboard=={tried[1]}" in dashboard and "--json" in dashboard
    assert ":latest" not in (DEPLOY / "compose.yaml").read_text()
    header = (DEPLOY / "compose.yaml").read_text().split("\nname:")[0]
    deploying = (ROOT / "docs" / "deploying.md").read_text()
    for text in (header, deploying):
        assert "OPS_TOKEN" in text and "ops console" in text
