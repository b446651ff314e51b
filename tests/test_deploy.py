"""deploy/kubernetes/: the manifests hang together, and the commands and probes they
name work against PostgreSQL (no cluster here: `make lint` checks the schemas)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.rpc import new_student
from tests.servers import SERVER, free_port

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[f"{document['kind']}/{document['metadata']['name']}"] = document
    return found


def only(items: list, what: str):
    assert len(items) == 1, f"expected one {what}, got {items}"
    return items[0]


def database_url_from_secret(container: dict, secret: dict) -> None:
    """ENROLLMENT_DATABASE_URL comes from the Secret, never from the command line."""
    env = {e["name"]: e for e in container["env"]}
    ref = env["ENROLLMENT_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not any("database-url" in arg for arg in container.get("args", []))


def test_the_manifests_hang_together():
    found = manifests()
    deployment = found["Deployment/enrollment"]
    secret = found["Secret/enrollment-database"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    container = only(pod["spec"]["containers"], "server container")
    database_url_from_secret(container, secret)
    port = only(container["ports"], "port")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == port["containerPort"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]

    headless = found["Service/enrollment-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    for service in (headless, found["Service/enrollment"]):
        assert service["spec"]["selector"].items() <= labels.items()
        assert only(service["spec"]["ports"], "port")["targetPort"] == port["name"]
    pdb = found["PodDisruptionBudget/enrollment"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    job = only([d for k, d in found.items() if k.startswith("Job/")], "migration Job")
    migrate = only(job["spec"]["template"]["spec"]["containers"], "migrate container")
    assert migrate["args"] == ["migrate"] and migrate["image"] == container["image"]
    database_url_from_secret(migrate, secret)


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


@pytest.mark.databases("postgresql")
def test_the_job_and_the_deployment_commands_migrate_then_serve(
    new_database, server_process, tmp_path
):
    found = manifests()
    job = only([d for k, d in found.items() if k.startswith("Job/")], "migration Job")
    migrate = job["spec"]["template"]["spec"]["containers"][0]
    pod = found["Deployment/enrollment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    url = new_database()
    # The container's env: the Secret's value. Its port: a free one here.
    env = {**os.environ, "ENROLLMENT_DATABASE_URL": url}
    port = free_port()
    args = [re.sub(r"^(--address=.*):\d+$", rf"\1:{port}", a) for a in container["args"]]
    assert args != container["args"], "the Deployment should pass --address=HOST:PORT"

    done = subprocess.run([SERVER, *migrate["args"]], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = server_process(
        argv=[SERVER, *args], port=port, env={"ENROLLMENT_DATABASE_URL": url}, cwd=tmp_path
    )
    with grpc.insecure_channel(server.address) as channel:
        assert new_student(pb_grpc.EnrollmentServiceStub(channel)).id >= 1
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        service = container[probe]["grpc"].get("service", "")
        assert health(server.address, service) == health_pb2.HealthCheckResponse.SERVING, probe
    assert server.stop(timeout=pod["terminationGracePeriodSeconds"]) == 0, server.log
