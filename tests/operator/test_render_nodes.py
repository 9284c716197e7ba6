"""render.py for jobs of several GPUs and nodes: the pods of a gang, their DNS names, the runtime's
rendezvous contract and the headless Service (pure functions, no cluster)."""

from __future__ import annotations

import copy
import re

import kubernetes_validate
import pytest

from grpo_operator import render
from grpo_runtime.spec import parse_job
from test_render import MANIFEST, env_of

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123: a pod's hostname and subdomain
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # a Service's name


def job(name: str = "gsm8k", **resources):
    manifest = copy.deepcopy(MANIFEST)
    manifest["metadata"]["name"] = name
    manifest["spec"]["resources"] = {**manifest["spec"]["resources"], **resources}
    manifest["spec"]["training"] = {"promptsPerStep": 24}  # whole prompts for each of 1, 2, 3, 4, 6 or 8 ranks
    del manifest["spec"]["affinity"]  # MANIFEST's is a placeholder no API server would take
    return parse_job(manifest)


def test_one_pod_per_node_with_indexed_names_and_labels():
    pods = render.pods(job(nodes=3), 2, image="x")
    assert [p["metadata"]["name"] for p in pods] == ["gsm8k-attempt-2-0", "gsm8k-attempt-2-1", "gsm8k-attempt-2-2"]
    assert [p["metadata"]["name"] for p in pods] == render.pod_names("gsm8k", 2, 3)
    assert [p["metadata"]["labels"][render.LABEL_NODE_INDEX] for p in pods] == ["0", "1", "2"]
    assert {p["metadata"]["labels"][render.LABEL_ATTEMPT] for p in pods} == {"2"}
    assert {env_of(p)["GRPO_ATTEMPT"]["value"] for p in pods} == {"2"}


def test_a_one_node_job_renders_as_before():
    """No Service, no DNS names, no rendezvous variables: the runtime's rendezvous stays on loopback."""
    one = job()
    (only,) = render.pods(one, 1, image="x")
    assert only == render.pod(one, 1, image="x")
    assert only["metadata"]["name"] == render.pod_name("gsm8k", 1) == render.pod_names("gsm8k", 1, 1)[0]
    assert render.LABEL_NODE_INDEX not in only["metadata"]["labels"]
    assert not {"hostname", "subdomain"} & only["spec"].keys()
    assert "ports" not in only["spec"]["containers"][0]
    assert not {"GRPO_NODE_RANK", "GRPO_MASTER_ADDR", "GRPO_MASTER_PORT"} & env_of(only).keys()
    assert [o["kind"] for o in render.support_objects(one)] == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap"]


def test_each_pod_knows_its_rank_and_where_pod_0_listens():
    pods = render.pods(job(nodes=2, gpus=4), 1, image="x")
    service = render.service(job(nodes=2))
    for index, pod in enumerate(pods):
        env = env_of(pod)
        assert env["GRPO_NODE_RANK"]["value"] == str(index)
        assert env["GRPO_MASTER_ADDR"]["value"] == f"gsm8k-attempt-1-0.{service['metadata']['name']}.team-a.svc"
        assert env["GRPO_MASTER_PORT"]["value"] == "29500"
        assert pod["spec"]["containers"][0]["ports"] == [
            {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"}]
    master = pods[0]["spec"]
    assert env_of(pods[1])["GRPO_MASTER_ADDR"]["value"] == f"{master['hostname']}.{master['subdomain']}.team-a.svc"


def test_the_rendezvous_contract_is_the_runtimes():
    from grpo_runtime import distributed

    assert (render.NODE_RANK_ENV, render.MASTER_ADDR_ENV, render.MASTER_PORT_ENV) == (
        distributed.NODE_RANK_ENV, distributed.MASTER_ADDR_ENV, distributed.MASTER_PORT_ENV)
    assert render.RENDEZVOUS_PORT == distributed.DEFAULT_MASTER_PORT


def test_the_headless_service_names_every_pod_of_the_job():
    gang = job(nodes=2)
    service = render.service(gang)
    pods = render.pods(gang, 1, image="x")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS records per pod, no virtual IP
    assert service["spec"]["publishNotReadyAddresses"] is True  # pod 0 resolves before anything is ready
    assert all(p["spec"]["subdomain"] == service["metadata"]["name"] for p in pods)
    selector = service["spec"]["selector"]
    assert all(selector.items() <= p["metadata"]["labels"].items() for p in pods)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == pods[0]["spec"]["containers"][0]["ports"][0]["name"]
    assert service["metadata"]["namespace"] == "team-a"
    assert [o["kind"] for o in render.support_objects(gang)][-1] == "Service"  # made before the pods


@pytest.mark.parametrize("name", ["a" * 63, "7" + "b" * 62, "gsm8k", "7b-run"])
def test_dns_names_fit_their_labels_whatever_the_job_name(name):
    """Job names are DNS labels of up to 63 characters; the pods' hostnames and the Service's name are too,
    and stay distinct: a hash of the whole name replaces what does not fit."""
    gang = job(name, nodes=3)
    service = render.service(gang)["metadata"]["name"]
    assert DNS_1035_LABEL.match(service) and len(service) <= 63, service
    hostnames = [p["spec"]["hostname"] for a in (1, 2, 10_000) for p in render.pods(gang, a, image="x")]
    assert all(DNS_LABEL.match(h) and len(h) <= 63 for h in hostnames), hostnames
    assert len(set(hostnames)) == len(hostnames)  # per pod and per attempt: no stale DNS answer for a new pod
    assert hostnames == [p["spec"]["hostname"] for a in (1, 2, 10_000) for p in render.pods(gang, a, image="x")]
    address = env_of(render.pod(gang, 1, index=1, image="x"))["GRPO_MASTER_ADDR"]["value"]
    assert address == f"{hostnames[0]}.{service}.team-a.svc"


def test_long_names_that_share_a_head_stay_apart():
    first, second = "x" * 62 + "1", "x" * 62 + "2"
    assert render.service_name(first) != render.service_name(second)
    assert render.hostname(first, 1, 0) != render.hostname(second, 1, 0)
    assert render.hostname("short", 1, 0) == "short-attempt-1-0"  # the pod's own name, where it fits


def test_each_pod_asks_for_its_gpus():
    gang = job(nodes=2, gpus=4, requests={"cpu": 4, "nvidia.com/gpu": 1})
    for pod in render.pods(gang, 1, image="x"):
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "4"  # not the spec's limit of 2: resources.gpus wins
        assert resources["requests"]["nvidia.com/gpu"] == "4"  # extended resources: requests == limits


def test_the_pods_and_the_service_are_valid_kubernetes_objects():
    gang = job(nodes=2, gpus=2)
    for obj in [*render.pods(gang, 1, image="x"), render.service(gang)]:
        assert kubernetes_validate.validate(obj, "1.33.0", strict=True) == "1.33"
