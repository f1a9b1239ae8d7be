"""The Helm chart, rendered and linted with the real Helm engine (helm-python-sdk): the
objects, RBAC verbs (no wildcards), probes, the sidecar's flags, and, when KUBECONFIG is set,
`kubectl apply --dry-run=server` of the rendered manifests."""

import os
import pathlib
import shutil
import subprocess

import helm_python
import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent / "serf-operator"

FULL = {
    "replicas": 2,
    "watchNamespaces": ["apps", "ops"],
    "serf": {
        "join": ["10.1.2.3:7946", "serf.example:7946"],
        "role": "web",
        "tags": {"dc": "eu-west"},
        "encryptKeySecret": {"name": "serf-keys", "key": "gossip"},
        "rpcAuthSecret": {"name": "serf-rpc", "key": "token"},
    },
    "metrics": {"port": 9090, "serviceMonitor": {"enabled": True, "interval": "15s"}},
}


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="serf-operator", namespace="serf-system", is_install=True)
    docs = []
    for text in out.values():
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def containers(docs):
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] + pod["initContainers"]}, pod


def env(c):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_lint_is_clean():
    for values in ({}, FULL):
        report = helm_python.lint(str(CHART), values, strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not errors, errors


def test_default_values():
    docs = render({})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "Deployment", "Role",
                            "RoleBinding", "Service", "ServiceAccount"])
    dep = by_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    cs, pod = containers(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in cs.values():
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    op = cs["operator"]
    assert op["args"] == ["run"]
    assert op["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert op["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env(op)["SERF_RPC_ADDR"] == "127.0.0.1:7373"
    assert "SERF_OPERATOR_LEADER_ELECT" not in env(op)
    agent = cs["serf-agent"]
    assert agent["command"] == ["serf", "agent"]
    assert "-node=$(POD_NAME)" in agent["args"]
    assert "-config-file=/serf-config/agent.json" in agent["args"]
    assert not any(a.startswith(("-encrypt", "-join")) for a in agent["args"])
    assert cs["agent-config"]["args"] == ["agent-config", "--out", "/serf-config/agent.json"]
    assert "env" not in cs["agent-config"]


def test_rbac_is_least_privilege():
    docs = render({})
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    verbs = {}
    for r in rules:
        assert "*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"]
        for res in r["resources"]:
            verbs[(r["apiGroups"][0], res)] = set(r["verbs"])
    assert verbs[("serf.operator.io", "serfhandlers")] == {"get", "list", "watch"}
    assert verbs[("serf.operator.io", "serfhandlers/status")] == {"get", "patch", "update"}
    assert verbs[("batch", "jobs")] == {"get", "list", "watch", "create", "delete"}
    # /serf/stdin Secrets (only for stdin a pod annotation cannot hold): made before the
    # Job, handed to it (patch), deleted when the Job is never created
    assert verbs[("", "secrets")] == {"create", "patch", "delete"}
    assert verbs[("events.k8s.io", "events")] == {"create", "patch"}
    state = [d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-state")][0]
    assert {"coordination.k8s.io"} <= {g for r in state["rules"] for g in r["apiGroups"]}


def test_full_values():
    docs = render(FULL)
    assert not by_kind(docs, "ClusterRole")
    roles = [d for d in by_kind(docs, "Role") if not d["metadata"]["name"].endswith("-state")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["apps", "ops"]
    assert by_kind(docs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 1
    assert by_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["interval"] == "15s"
    dep = by_kind(docs, "Deployment")[0]
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    cs, _ = containers(docs)
    agent = cs["serf-agent"]
    for flag in ["-tag=role=web", "-tag=dc=eu-west", "-join=10.1.2.3:7946",
                 "-join=serf.example:7946", "-encrypt=$(SERF_ENCRYPT_KEY)"]:
        assert flag in agent["args"], flag
    assert env(agent)["SERF_ENCRYPT_KEY"] == {"secretKeyRef": {"name": "serf-keys", "key": "gossip"}}
    token = {"secretKeyRef": {"name": "serf-rpc", "key": "token"}}
    assert env(cs["agent-config"])["SERF_RPC_AUTH"] == token
    op = env(cs["operator"])
    assert op["SERF_RPC_AUTH"] == token
    assert op["SERF_OPERATOR_LEADER_ELECT"] == "true"
    assert op["SERF_OPERATOR_NAMESPACES"] == "apps,ops"
    assert op["SERF_OPERATOR_METRICS_ADDR"] == "0.0.0.0:9090"


def test_schema_refuses_bad_values():
    with pytest.raises(helm_python.HelmError):
        render({"replicas": 0})
    with pytest.raises(helm_python.HelmError):
        render({"operator": {"logFormat": "xml"}})


def test_the_chart_carries_both_crds():
    on_disk = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert on_disk == ["serfeventtriggers.serf.operator.io.yaml", "serfhandlers.serf.operator.io.yaml"]
    for p in (CHART / "crds").glob("*.yaml"):
        crd = yaml.safe_load(p.read_text())
        assert crd["kind"] == "CustomResourceDefinition"


@pytest.mark.skipif(not os.environ.get("KUBECONFIG") or not shutil.which("kubectl"),
                    reason="needs a real cluster (KUBECONFIG) and kubectl")
def test_server_dry_run(tmp_path):
    kubectl = shutil.which("kubectl")
    for i, values in enumerate(({}, FULL)):
        f = tmp_path / f"r{i}.yaml"
        f.write_text("\n---\n".join(yaml.safe_dump(d) for d in render(values)
                                      if d["kind"] != "ServiceMonitor"))
        subprocess.run([kubectl, "create", "namespace", "serf-system"], capture_output=True)
        r = subprocess.run([kubectl, "apply", "--dry-run=server", "-f", str(f)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
