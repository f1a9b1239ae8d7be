"""The Helm chart, rendered and linted with the real Helm engine (helm-python-sdk): the
objects, RBAC verbs (no wildcards), probes, the sidecar's flags, no key on any command line,
the values the schema refuses, the probe and preStop commands run against real `serf agent`
processes, and, when KUBECONFIG is set, `kubectl apply --dry-run=server` of the rendered
manifests."""

import os
import pathlib
import shutil
import socket
import subprocess
import time

import json
import re

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

# A bare node: the node's network, the agent on its loopback, RPC on another port.
HOST = {
    "hostNetwork": True,
    "terminationGracePeriodSeconds": 60,
    "serf": {
        "join": ["127.0.0.1:17946"],
        "retryInterval": "2s",
        "retryMax": 10,
        "bindAddr": "127.0.0.1",
        "bindPort": 7950,
        "advertiseAddr": "127.0.0.1",
        "rpcPort": 9373,
        "leaveDelaySeconds": 3,
        "extraArgs": ["-log-level=debug", "-profile=local"],
        "encryptKeySecret": {"name": "serf-keys"},
        "rpcAuthSecret": {"name": "serf-rpc"},
    },
    "operator": {"extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                              {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"}]},
    "metrics": {"port": 9081},
}

CONFIG = "/serf-config/agent.json"


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


def commands(c):
    """Every command line a container runs: command + args, the probes' and hooks' exec."""
    out = [c.get("command", []) + c.get("args", [])]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        out.append(c.get(probe, {}).get("exec", {}).get("command", []))
    for hook in ("preStop", "postStart"):
        out.append(c.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command", []))
    return [x for x in out if x]


def test_lint_is_clean():
    for values in ({}, FULL, HOST):
        report = helm_python.lint(str(CHART), values, strict=True)
        errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not errors, errors


def test_default_values():
    docs = render({})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy",
                            "Role", "RoleBinding", "Service", "ServiceAccount"])
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
    assert "-rpc-addr=127.0.0.1:7373" in agent["args"]
    assert "-bind=0.0.0.0:7946" in agent["args"] and "-advertise=$(POD_IP):7946" in agent["args"]
    assert not any(a.startswith(("-encrypt", "-join", "-retry")) for a in agent["args"])
    # Without join addresses the agent is alone by design: Ready when it answers on RPC.
    assert agent["readinessProbe"]["exec"]["command"] == ["serf", "info", "-rpc-addr=127.0.0.1:7373"]
    assert cs["agent-config"]["args"] == ["agent-config", "--out", CONFIG, "--leave-on-terminate=true"]
    assert "env" not in cs["agent-config"]
    assert "SERF_RPC_AUTH" not in env(agent) and "SERF_ENCRYPT_KEY" not in env(agent)
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod
    assert pod["terminationGracePeriodSeconds"] == 45


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
    assert verbs[("", "pods")] == {"get", "list", "watch"}
    assert verbs[("", "pods/log")] == {"get"}
    # launch ledgers: read by a list of a handler's segments, an aged-out segment deleted
    assert verbs[("", "configmaps")] == {"get", "list", "create", "patch", "delete"}
    assert verbs[("events.k8s.io", "events")] == {"create", "patch"}
    state = [d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-state")][0]
    assert {"coordination.k8s.io"} <= {g for r in state["rules"] for g in r["apiGroups"]}
    # the membership record; the Job creates handed over at shutdown, deleted once taken back;
    # the key rotation's record: by name, the release's (create cannot be limited by name)
    own = [r for r in state["rules"] if r["resources"] == ["configmaps"]]
    assert own == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch", "delete"],
         "resourceNames": ["serf-operator-membership", "serf-operator-pending-launches",
                           "serf-operator-keyring"]
         + [f"serf-operator-membership-{i:02d}" for i in range(64)]}]
    lease = [r for r in state["rules"] if r["resources"] == ["leases"]]
    assert lease[1]["resourceNames"] == ["serf-operator"]


def test_state_objects_are_named_per_release():
    """Two releases in one namespace: each operator gets its own state prefix (the release's
    name, or operator.statePrefix), and its Role names exactly its own state objects."""
    chart = helm_python.Chart.load(str(CHART))
    for release, values, prefix in [("blue", {}, "blue"), ("green", {}, "green"),
                                    ("old", {"operator": {"statePrefix": "serf-operator"}},
                                     "serf-operator")]:
        values = {**values, "serf": {"encryptKeySecret": {"name": "k"}}}
        out = chart.render(values, name=release, namespace="serf-system", is_install=True)
        docs = [d for t in out.values() for d in yaml.safe_load_all(t) if d]
        cs, pod = containers(docs)
        assert env(cs["operator"])["SERF_OPERATOR_STATE_PREFIX"] == prefix
        state = [d for d in by_kind(docs, "Role") if d["metadata"]["name"] == f"{release}-state"][0]
        names = {n for r in state["rules"] for n in r.get("resourceNames", [])}
        assert {f"{prefix}-membership", f"{prefix}-pending-launches", f"{prefix}-keyring",
                prefix} <= names, names
        assert {f"{prefix}-membership-00", f"{prefix}-membership-63"} <= names, names
        assert not any(n.startswith("serf-operator-") for n in names if prefix != "serf-operator")
        vol = [v for v in pod["volumes"] if v["name"] == "serf-keyring-state"][0]
        assert vol["configMap"]["name"] == f"{prefix}-keyring"
        # The release's Deployment owns them (garbage-collected at uninstall), read by name.
        assert env(cs["operator"])["SERF_OPERATOR_OWNER_DEPLOYMENT"] == release
        assert by_kind(docs, "Deployment")[0]["metadata"]["name"] == release
        assert {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [release],
                "verbs": ["get"]} in state["rules"]
    with pytest.raises(helm_python.HelmError, match="statePrefix"):
        render({"operator": {"statePrefix": "Blue_1"}})


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
    for flag in ["-tag=role=web", "-tag=dc=eu-west", "-retry-join=10.1.2.3:7946",
                 "-retry-join=serf.example:7946", "-retry-interval=5s", "-retry-max=0"]:
        assert flag in agent["args"], flag
    # -join makes the agent exit when no address answers at start (a crash loop)
    assert not any(a.startswith(("-join", "-encrypt")) for a in agent["args"])
    token = {"secretKeyRef": {"name": "serf-rpc", "key": "token"}}
    gossip = {"secretKeyRef": {"name": "serf-keys", "key": "gossip"}}
    others = {"secretKeyRef": {"name": "serf-keys", "key": "keys", "optional": True}}
    assert env(cs["agent-config"]) == {"SERF_RPC_AUTH": token, "SERF_ENCRYPT_KEY": gossip,
                                       "SERF_ENCRYPT_KEYS": others}
    # the agent's own `serf` commands (probe, preStop) read the RPC key from the environment
    assert env(agent)["SERF_RPC_AUTH"] == token and "SERF_ENCRYPT_KEY" not in env(agent)
    # Joined: Ready once a member other than the agent itself is alive.
    probe = agent["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"] and "serf members -rpc-addr=127.0.0.1:7373 -status=alive" in probe[2]
    op = env(cs["operator"])
    assert op["SERF_RPC_AUTH"] == token
    assert op["SERF_OPERATOR_LEADER_ELECT"] == "true"
    assert op["SERF_OPERATOR_NAMESPACES"] == "apps,ops"
    assert op["SERF_OPERATOR_METRICS_ADDR"] == "0.0.0.0:9090"


def test_no_key_on_any_command_line():
    """The gossip key reaches the agent through its config file, written by the init
    container from the Secret; no command line (readable by anyone on the node through the
    process list) holds a key or a reference to one."""
    for values in (FULL, HOST):
        cs, pod = containers(render(values))
        for name, c in cs.items():
            for cmd in commands(c):
                line = " ".join(cmd)
                for word in ("encrypt", "ENCRYPT", "rpc-auth", "RPC_AUTH", "$(SERF_"):
                    assert word not in line, (name, line)
            if name != "agent-config":
                assert "SERF_ENCRYPT_KEY" not in env(c), name
        assert "SERF_ENCRYPT_KEY" in env(cs["agent-config"])


def test_agent_config_file_is_private():
    """The file holding the keys: written by `agent-config` (mode 0600, the Rust tests check
    it) at the path the agent reads, on a memory-backed volume the agent mounts read-only;
    every container runs as uid 65532, so the agent, as the file's owner, can read it."""
    cs, pod = containers(render(FULL))
    assert cs["agent-config"]["args"][:3] == ["agent-config", "--out", CONFIG]
    assert f"-config-file={CONFIG}" in cs["serf-agent"]["args"]
    vol = [v for v in pod["volumes"] if v["name"] == "serf-config"][0]
    assert vol["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in cs["serf-agent"]["volumeMounts"]}
    assert mounts["serf-config"]["readOnly"] is True
    assert "serf-config" not in {m["name"] for m in cs["operator"].get("volumeMounts", [])}
    assert pod["securityContext"]["runAsUser"] == 65532
    for c in cs.values():
        assert "runAsUser" not in c["securityContext"], c["name"]


def test_graceful_leave_at_termination():
    """An operator pod that goes away leaves the Serf cluster (its peers see member-leave,
    not member-failed): leave_on_terminate in the agent's config, and a preStop that leaves
    after the operator (SIGTERM at once) has stopped reading events."""
    for values, port, delay, grace in ((FULL, 7373, 2, 45), (HOST, 9373, 3, 60)):
        cs, pod = containers(render(values))
        assert "--leave-on-terminate=true" in cs["agent-config"]["args"]
        pre = cs["serf-agent"]["lifecycle"]["preStop"]["exec"]["command"]
        assert pre == ["sh", "-c", f"sleep {delay}; exec serf leave -rpc-addr=127.0.0.1:{port}"]
        assert "lifecycle" not in cs["operator"]
        assert pod["terminationGracePeriodSeconds"] == grace


def test_bare_node_values():
    docs = render(HOST)
    cs, pod = containers(docs)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    args = cs["serf-agent"]["args"]
    for flag in ["-bind=127.0.0.1:7950", "-advertise=127.0.0.1:7950", "-rpc-addr=127.0.0.1:9373",
                 "-retry-join=127.0.0.1:17946", "-retry-interval=2s", "-retry-max=10",
                 "-log-level=debug", "-profile=local"]:
        assert flag in args, flag
    ports = {p["name"]: p["containerPort"] for p in cs["serf-agent"]["ports"]}
    assert ports == {"gossip-tcp": 7950, "gossip-udp": 7950}
    op = env(cs["operator"])
    assert op["SERF_RPC_ADDR"] == "127.0.0.1:9373"
    assert op["SERF_OPERATOR_METRICS_ADDR"] == "0.0.0.0:9081"
    assert op["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and op["KUBERNETES_SERVICE_PORT"] == "6443"
    # The RPC port is one value: the default port appears nowhere.
    dep = yaml.safe_dump(by_kind(docs, "Deployment")[0])
    assert "7373" not in dep
    assert dep.count("127.0.0.1:9373") == 5  # agent flag, probes (2), preStop, operator env


def test_advertise_address_and_readiness_choice():
    def agent(serf):
        cs, _ = containers(render({"serf": serf}))
        return cs["serf-agent"]
    assert "-advertise=10.9.8.7:7946" in agent({"advertiseAddr": "10.9.8.7"})["args"]
    assert "-advertise=node.example:30946" in agent({"advertiseAddr": "node.example:30946"})["args"]
    assert "-advertise=[fd00::1]:7946" in agent({"advertiseAddr": "[fd00::1]"})["args"]
    probe = agent({"join": ["10.0.0.1:7946"], "readyWithoutPeers": True})["readinessProbe"]
    assert probe["exec"]["command"] == ["serf", "info", "-rpc-addr=127.0.0.1:7373"]


@pytest.mark.parametrize("values", [
    {"replicas": 0},
    {"operator": {"logFormat": "xml"}},
    {"hostNetwork": "yes"},
    {"terminationGracePeriodSeconds": 0},
    {"serf": {"rpcPort": 0}},
    {"serf": {"rpcPort": 70000}},
    {"serf": {"rpcPort": "7373"}},
    {"serf": {"bindAddr": "0.0.0.0:7946"}},
    {"serf": {"bindAddr": ""}},
    {"serf": {"advertiseAddr": "a b"}},
    {"serf": {"advertiseAddr": "fd00::1"}},
    {"serf": {"retryInterval": "5"}},
    {"serf": {"retryMax": -1}},
    {"serf": {"readyWithoutPeers": "no"}},
    {"serf": {"leaveDelaySeconds": -1}},
    {"serf": {"extraArgs": ["-encrypt=c2VjcmV0c2VjcmV0c2VjcmV0MQ=="]}},
    {"serf": {"extraArgs": ["--encrypt", "x"]}},
    {"serf": {"encryptKeySecret": {"name": "k", "key": "keys"}}},
    {"serf": {"encryptKeySecret": {"name": "k", "rotate": "yes"}}},
    {"operator": {"extraEnv": [{"value": "no name"}]}},
    # checks of the template: ports that collide in the pod's network, a grace period too
    # short for the delay and the leave
    {"serf": {"rpcPort": 7946}},
    {"metrics": {"port": 7373}},
    {"terminationGracePeriodSeconds": 10},
    {"serf": {"leaveDelaySeconds": 40}},
])
def test_schema_refuses_bad_values(values):
    with pytest.raises(helm_python.HelmError):
        render(values)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERF_RPC_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, **kw)


@pytest.mark.skipif(not shutil.which("serf") or not shutil.which("sh"),
                    reason="needs the serf binary")
def test_probe_and_prestop_against_real_agents(tmp_path):
    """The rendered readiness probe fails while the agent is alone and passes once it has
    joined; the rendered preStop makes it leave: its peer sees it `left`, not `failed`."""
    rpc, bind, peer_rpc, peer_bind = (free_port() for _ in range(4))
    values = {"serf": {"join": [f"127.0.0.1:{peer_bind}"], "rpcPort": rpc,
                       "leaveDelaySeconds": 0}}
    cs, _ = containers(render(values))
    agent = cs["serf-agent"]
    probe = agent["readinessProbe"]["exec"]["command"]
    pre_stop = agent["lifecycle"]["preStop"]["exec"]["command"]
    # The sidecar's own flags, with the pod's fields filled in as Kubernetes would.
    args = [a.replace("$(POD_NAME)", "op-pod").replace("$(POD_IP)", "127.0.0.1")
             .replace("0.0.0.0:", "127.0.0.1:").replace(":7946", f":{bind}")
            for a in agent["args"] if not a.startswith("-config-file")]
    config = tmp_path / "agent.json"
    config.write_text('{"leave_on_terminate": true}')
    args.append(f"-config-file={config}")
    procs = []
    try:
        procs.append(subprocess.Popen(agent["command"] + args, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
        until(lambda: sh(["serf", "info", f"-rpc-addr=127.0.0.1:{rpc}"]).returncode == 0)
        assert sh(probe).returncode != 0, "Ready while alone"
        procs.append(subprocess.Popen(
            ["serf", "agent", "-node=peer", f"-bind=127.0.0.1:{peer_bind}",
             f"-rpc-addr=127.0.0.1:{peer_rpc}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        # -retry-join (interval 5s) reaches the peer once it is up
        until(lambda: sh(probe).returncode == 0, within=20)
        r = sh(pre_stop)
        assert r.returncode == 0, r.stdout + r.stderr
        members = lambda: sh(["serf", "members", f"-rpc-addr=127.0.0.1:{peer_rpc}"]).stdout
        until(lambda: "op-pod" in members() and " left" in members())
        assert " failed" not in members()
        procs[0].wait(timeout=10)  # the agent exits after leaving
    finally:
        for p in procs:
            p.kill()
            p.wait()


def until(cond, within=10.0):
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_the_chart_carries_every_crd():
    on_disk = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert on_disk == [
        "serfeventtriggers.serf.operator.io.yaml",
        "serfhandlers.serf.operator.io.yaml",
        "serfservices.serf.operator.io.yaml",
    ]
    for p in (CHART / "crds").glob("*.yaml"):
        crd = yaml.safe_load(p.read_text())
        assert crd["kind"] == "CustomResourceDefinition"


@pytest.mark.skipif(not os.environ.get("KUBECONFIG") or not shutil.which("kubectl"),
                    reason="needs a real cluster (KUBECONFIG) and kubectl")
def test_server_dry_run(tmp_path):
    kubectl = shutil.which("kubectl")
    # The release namespace and the watched ones must exist; those made here are removed.
    made = []
    try:
        gossip = [{"serf": {"gossipService": {"enabled": True, "nodePort": 30946}}},
                  {"serf": {"gossipService": {"enabled": True, "type": "LoadBalancer",
                                              "advertiseAddr": "203.0.113.7"}}}]
        for i, values in enumerate([{}, FULL, HOST] + gossip):
            f = tmp_path / f"r{i}.yaml"
            f.write_text("\n---\n".join(yaml.safe_dump(d) for d in render(values)
                                          if d["kind"] not in ("ServiceMonitor", "PrometheusRule")))
            for ns in ["serf-system"] + values.get("watchNamespaces", []):
                if subprocess.run([kubectl, "create", "namespace", ns],
                                  capture_output=True).returncode == 0:
                    made.append(ns)
            r = subprocess.run([kubectl, "apply", "--dry-run=server", "-f", str(f)],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
    finally:
        for ns in made:
            subprocess.run([kubectl, "delete", "namespace", ns, "--wait=false"],
                           capture_output=True)


def test_rpc_for_jobs_only_when_enabled_and_only_with_auth():
    # Off by default: the RPC stays on loopback, no Service, no policy.
    docs = render(FULL)
    assert not [d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-rpc")]
    assert not [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-rpc")]
    # Never without RPC auth.
    with pytest.raises(helm_python.HelmError, match="needs serf.rpcAuthSecret"):
        render({"serf": {"rpcForJobs": {"enabled": True}}})
    values = {**FULL, "serf": {**FULL["serf"], "rpcForJobs": {"enabled": True}}}
    docs = render(values)
    cs, _ = containers(docs)
    agent = cs["serf-agent"]
    assert "-rpc-addr=0.0.0.0:7373" in agent["args"]
    assert {"name": "rpc", "containerPort": 7373, "protocol": "TCP"} in agent["ports"]
    # The operator, the probe and the leave still use loopback.
    assert env(cs["operator"])["SERF_RPC_ADDR"] == "127.0.0.1:7373"
    svc = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "serf-operator-rpc"][0]
    assert svc["spec"]["ports"] == [{"name": "rpc", "port": 7373, "targetPort": "rpc", "protocol": "TCP"}]
    pol = [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-rpc")][0]
    rpc_rule = [r for r in pol["spec"]["ingress"] if r["ports"] == [{"port": 7373, "protocol": "TCP"}]][0]
    assert rpc_rule["from"][0]["podSelector"]["matchExpressions"] == [
        {"key": "serf.operator.io/handler", "operator": "Exists"}]
    values["serf"]["rpcForJobs"]["networkPolicy"] = False
    assert not [d for d in by_kind(render(values), "NetworkPolicy")
                if d["metadata"]["name"].endswith("-rpc")]
    report = helm_python.lint(str(CHART), values, strict=True)
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]



DISCOVERY_RULES = [
    {"apiGroups": ["serf.operator.io"], "resources": ["serfservices"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["serf.operator.io"], "resources": ["serfservices/status"],
     "verbs": ["get", "patch", "update"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "patch", "delete"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "create", "patch", "delete"]},
]


def test_discovery_rbac_and_flag_only_when_enabled():
    # Off by default: no rule on serfservices, services or endpointslices, no flag.
    for values in ({}, {"watchNamespaces": ["apps"]}):
        docs = render(values)
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for r in role["rules"]:
                assert not {"serfservices", "serfservices/status", "services", "endpointslices"} \
                    & set(r["resources"]), (role["metadata"]["name"], r)
        cs, _ = containers(docs)
        assert "SERF_OPERATOR_DISCOVERY" not in env(cs["operator"])
    # On, cluster-wide: the ClusterRole carries exactly these rules.
    docs = render({"discovery": {"enabled": True}})
    rules = by_kind(docs, "ClusterRole")[0]["rules"]
    for want in DISCOVERY_RULES:
        assert want in rules
    cs, _ = containers(docs)
    assert env(cs["operator"])["SERF_OPERATOR_DISCOVERY"] == "true"
    # On, in watched namespaces: each namespace's Role, and nothing cluster-wide.
    docs = render({"discovery": {"enabled": True}, "watchNamespaces": ["apps", "ops"]})
    assert not by_kind(docs, "ClusterRole")
    for ns in ("apps", "ops"):
        role = [d for d in by_kind(docs, "Role") if d["metadata"].get("namespace") == ns][0]
        for want in DISCOVERY_RULES:
            assert want in role["rules"]
    with pytest.raises(helm_python.HelmError):
        render({"discovery": {"enabled": "yes"}})
    with pytest.raises(helm_python.HelmError):
        render({"discovery": {"enabled": True, "extra": 1}})
    report = helm_python.lint(str(CHART), {"discovery": {"enabled": True}}, strict=True)
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def test_watched_kinds_are_readable_and_nothing_more():
    values = {"watchNamespaces": ["apps"],
              "watchKinds": [{"apiGroup": "", "resources": ["configmaps"]},
                             {"apiGroup": "apps", "resources": ["deployments", "statefulsets"]}]}
    docs = render(values)
    role = [d for d in by_kind(docs, "Role") if d["metadata"]["namespace"] == "apps"][0]
    rules = [r for r in role["rules"] if r["verbs"] == ["get", "list", "watch"]]
    assert {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]} in rules
    assert {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets"],
            "verbs": ["get", "list", "watch"]} in rules
    for bad in ({"apiGroup": "*", "resources": ["pods"]}, {"apiGroup": "", "resources": ["*"]},
                {"apiGroup": "", "resources": []}):
        with pytest.raises(helm_python.HelmError):
            render({"watchKinds": [bad]})


# Checks of the scanner that the default values cannot pass, each with its reason (README,
# "Security scanners"): the user's registry decides both.
CHECKOV_SKIPS = {
    # The chart cannot know the digest of the image the user runs: image.digest pins it.
    "CKV_K8S_43": "image digest: set image.digest",
    # Pulling on every start makes each restart depend on the registry; a digest (above)
    # is what makes the image immutable. image.pullPolicy: Always passes it.
    "CKV_K8S_15": "imagePullPolicy Always: set image.pullPolicy",
}


def checkov(tmp_path, values, skips):
    d = tmp_path / "rendered"
    d.mkdir()
    (d / "chart.yaml").write_text("\n---\n".join(yaml.safe_dump(x) for x in render(values)))
    exe = pathlib.Path(os.sys.executable).parent / "checkov"
    if not exe.exists():
        pytest.fail("checkov is not installed in the test venv (scripts/test.sh installs it)")
    cmd = [str(exe), "-d", str(d), "--framework", "kubernetes", "-o", "json", "--quiet",
           "--skip-download"]
    if skips:
        cmd += ["--skip-check", ",".join(skips)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = json.loads(r.stdout) if r.stdout.strip() else {}
    results = out.get("results", {})
    failed = [(f["check_id"], f["resource"]) for f in results.get("failed_checks", [])]
    summary = out.get("summary", {})
    assert summary.get("failed") == len(failed) and summary.get("parsing_errors") == 0, r.stdout
    return failed, summary.get("passed", 0), r


def test_security_scanner_default_values(tmp_path):
    """checkov (pinned in scripts/test.sh) on the rendered chart, default values: nothing
    fails but the checks in CHECKOV_SKIPS, which only the user's image settings can pass."""
    failed, passed, r = checkov(tmp_path, {}, CHECKOV_SKIPS)
    assert passed > 100, r.stdout[-2000:] + r.stderr[-2000:]
    assert failed == [], failed


def test_security_scanner_passes_everything_with_a_pinned_image(tmp_path):
    values = {"image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"}}
    docs = render(values)
    cs, _ = containers(docs)
    assert all(c["image"].endswith("@sha256:" + "a" * 64) for c in cs.values())
    failed, passed, r = checkov(tmp_path, values, {})
    assert passed > 100, r.stdout[-2000:] + r.stderr[-2000:]
    assert failed == [], failed


def test_api_token_only_in_the_operator_container():
    cs, pod = containers(render({}))
    assert pod["automountServiceAccountToken"] is False
    vol = {v["name"]: v for v in pod["volumes"]}["api-token"]["projected"]["sources"]
    assert vol[0]["serviceAccountToken"]["path"] == "token"
    assert vol[1]["configMap"]["name"] == "kube-root-ca.crt"
    assert vol[2]["downwardAPI"]["items"][0]["path"] == "namespace"
    for name, c in cs.items():
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        if name == "operator":
            assert mounts["api-token"] == "/var/run/secrets/kubernetes.io/serviceaccount"
        else:
            assert "api-token" not in mounts


def test_probes_and_resources_on_every_container():
    cs, _ = containers(render({}))
    for name, c in cs.items():
        for kind in ("requests", "limits"):
            assert set(c["resources"][kind]) == {"cpu", "memory"}, (name, kind)
        if name != "agent-config":
            assert "livenessProbe" in c and "readinessProbe" in c, name
    assert cs["serf-agent"]["livenessProbe"]["exec"]["command"] == [
        "serf", "info", "-rpc-addr=127.0.0.1:7373"]


def test_network_policy_admits_only_gossip_and_metrics():
    docs = render({})
    (np,) = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == \
        by_kind(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    assert "from" not in rule
    assert sorted((p["port"], p["protocol"]) for p in rule["ports"]) == \
        [(7946, "TCP"), (7946, "UDP"), (8080, "TCP")]
    # The RPC port is never in it, also not with rpcForJobs (rpc.yaml admits the Jobs).
    docs = render({"serf": {"rpcForJobs": {"enabled": True}, "rpcAuthSecret": {"name": "k"}},
                   "metrics": {"port": 9090}})
    mine = [n for n in by_kind(docs, "NetworkPolicy") if n["metadata"]["name"] == "serf-operator"]
    assert sorted(p["port"] for p in mine[0]["spec"]["ingress"][0]["ports"]) == [7946, 7946, 9090]
    assert not by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_pod_placement_and_extras():
    values = {
        "podLabels": {"team": "ops"},
        "podAnnotations": {"example.com/scrape": "true"},
        "priorityClassName": "system-cluster-critical",
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway"}],
        "extraVolumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
        "operator": {"extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/corp-ca"}],
                     "extraEnv": [{"name": "SSL_CERT_DIR", "value": "/etc/corp-ca"}]},
    }
    docs = render(values)
    dep = by_kind(docs, "Deployment")[0]
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["labels"]["team"] == "ops"
    assert tmpl["metadata"]["annotations"] == {"example.com/scrape": "true"}
    # The selector stays the chart's: pod labels never change it.
    assert "team" not in dep["spec"]["selector"]["matchLabels"]
    cs, pod = containers(docs)
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert {"name": "ca", "configMap": {"name": "corp-ca"}} in pod["volumes"]
    assert {"name": "ca", "mountPath": "/etc/corp-ca"} in cs["operator"]["volumeMounts"]
    assert env(cs["operator"])["SSL_CERT_DIR"] == "/etc/corp-ca"
    cs, pod = containers(render({}))
    assert "priorityClassName" not in pod and "topologySpreadConstraints" not in pod


def registered_metrics():
    """Every name the operator exposes, read from operator/src/metrics.rs (the registry,
    prefix serf_operator): counters carry _total, histograms _bucket/_sum/_count."""
    src = (CHART.parent.parent / "operator" / "src" / "metrics.rs").read_text()
    assert 'Registry::with_prefix("serf_operator")' in src
    names = re.findall(r'registry\.register\(\s*"([a-z_]+)"', src)
    assert len(names) > 10, names
    out = set()
    for n in names:
        base = "serf_operator_" + n
        out |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
    return out


def test_alert_rules_and_dashboard_use_real_metrics():
    assert not [d for d in render({}) if d["kind"] in ("PrometheusRule", "ConfigMap")]
    docs = render({"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                               "dashboard": {"enabled": True}}})
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    for a in ("SerfOperatorEventsDropped", "SerfOperatorJobLaunchFailures",
              "SerfOperatorReportsNotSent", "SerfOperatorLeaderChanges"):
        assert a in alerts
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["serf-operator.json"])
    exprs = list(alerts.values()) + [t["expr"] for p in dash["panels"] for t in p["targets"]]
    known = registered_metrics()
    used = {m for e in exprs for m in re.findall(r"serf_operator_[a-z_]+", e)}
    assert used and used <= known, sorted(used - known)
    # Label names the rules and panels group or filter by are the registry's label names.
    src = (CHART.parent.parent / "operator" / "src" / "metrics.rs").read_text()
    labels = set(re.findall(r"pub ([a-z_]+): String", src)) | {"namespace", "pod", "le"}
    for e in exprs:
        for grp in re.findall(r"by \(([^)]*)\)", e):
            assert {x.strip() for x in grp.split(",")} <= labels, e
        for lab in re.findall(r"\{([a-z_]+)[!=]", e):
            assert lab in labels, e


def test_gossip_keyring_file_and_rotation():
    """With encryptKeySecret the agent gets a keyring file (primary first, then the Secret's
    `keys`) on a memory volume it can write, so keyring changes made over RPC survive its
    restart; the operator rotates the cluster to the Secret, and may read that one Secret by
    name and nothing more; `rotate: false` leaves rotation off but keeps the keyring file."""
    docs = render(FULL)
    cs, pod = containers(docs)
    assert "--keyring-file=/serf-keyring/keyring.json" in cs["agent-config"]["args"]
    # a pod started mid-rotation puts the key the cluster still uses first
    assert "--primary-in-use-file=/serf-keyring-state/primary" in cs["agent-config"]["args"]
    state_vol = [v for v in pod["volumes"] if v["name"] == "serf-keyring-state"][0]
    assert state_vol["configMap"] == {"name": "serf-operator-keyring", "optional": True,
                                      "items": [{"key": "primary", "path": "primary"}]}
    vol = [v for v in pod["volumes"] if v["name"] == "serf-keyring"][0]
    assert vol["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in cs["serf-agent"]["volumeMounts"]}
    assert mounts["serf-keyring"]["mountPath"] == "/serf-keyring"
    assert not mounts["serf-keyring"].get("readOnly"), "the agent writes its keyring file"
    op = env(cs["operator"])
    assert op["SERF_OPERATOR_KEYRING_SECRET"] == "serf-keys"
    assert op["SERF_OPERATOR_KEYRING_SECRET_KEY"] == "gossip"
    state = [d for d in by_kind(docs, "Role") if d["metadata"]["name"].endswith("-state")][0]
    secrets = [r for r in state["rules"] if r["resources"] == ["secrets"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"],
                        "resourceNames": ["serf-keys"], "verbs": ["get", "list", "watch"]}]
    assert {"apiGroups": ["events.k8s.io"], "resources": ["events"],
            "verbs": ["create", "patch"]} in state["rules"]

    off = render({"serf": {"encryptKeySecret": {"name": "serf-keys", "rotate": False}}})
    cs, _ = containers(off)
    assert "--keyring-file=/serf-keyring/keyring.json" in cs["agent-config"]["args"]
    assert "SERF_OPERATOR_KEYRING_SECRET" not in env(cs["operator"])
    state = [d for d in by_kind(off, "Role") if d["metadata"]["name"].endswith("-state")][0]
    assert not [r for r in state["rules"] if r["resources"] == ["secrets"]]

    cs, pod = containers(render({}))
    assert not any(a.startswith("--keyring-file") for a in cs["agent-config"]["args"])
    assert "serf-keyring" not in {v["name"] for v in pod["volumes"]}


def test_unknown_values_are_refused():
    """A misspelt or unknown key (`--set replicaCount=3`, a nested typo) fails the install
    with Helm's schema message naming it, instead of being ignored."""
    for values, key in [({"replicaCount": 3}, "replicaCount"),
                        ({"serf": {"joins": ["10.0.0.1"]}}, "joins"),
                        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
                        ({"resources": {"operator": {"limit": {"cpu": "1"}}}}, "limit"),
                        ({"image": {"tags": "1.0"}}, "tags")]:
        with pytest.raises(helm_python.HelmError, match=f"{key}.*not allowed|not allowed.*{key}"):
            render(values)
    # Free-form maps stay open.
    render({"podLabels": {"any-key": "v"}, "nodeSelector": {"kubernetes.io/os": "linux"},
            "serf": {"tags": {"dc": "eu"}}, "affinity": {"nodeAffinity": {}},
            "resources": {"operator": {"limits": {"cpu": "1", "ephemeral-storage": "1Gi"}}}})


def test_every_value_is_in_the_schema():
    """values.yaml and the schema name the same keys, at every level the schema closes."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v, s, path):
        props = s.get("properties", {})
        for k, sub in v.items():
            assert k in props, f"{path}{k} is in values.yaml, not in the schema"
            if isinstance(sub, dict) and "properties" in props[k]:
                walk(sub, props[k], f"{path}{k}.")
        if s.get("additionalProperties") is False:
            for k in props:
                assert k in v, f"{path}{k} is in the schema, not in values.yaml (no default)"

    walk(values, schema, "")


def test_gossip_service_exposes_the_agent_and_sets_what_it_advertises():
    """serf.gossipService: a NodePort (or LoadBalancer) Service for the gossip port, TCP and
    UDP, and the agent advertising the address members reach it at through it."""
    docs = render({"serf": {"gossipService": {"enabled": True, "nodePort": 30946}}})
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-gossip")]
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"] == by_kind(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"]
    assert sorted((p["protocol"], p["port"], p["targetPort"], p["nodePort"])
                  for p in svc["spec"]["ports"]) == [("TCP", 7946, 7946, 30946),
                                                      ("UDP", 7946, 7946, 30946)]
    cs, _ = containers(docs)
    agent = cs["serf-agent"]
    assert "-advertise=$(HOST_IP):30946" in agent["args"]
    assert env(agent)["HOST_IP"] == {"fieldRef": {"fieldPath": "status.hostIP"}}

    docs = render({"serf": {"gossipService": {
        "enabled": True, "type": "LoadBalancer", "advertiseAddr": "203.0.113.7",
        "loadBalancerIP": "203.0.113.7", "annotations": {"example.com/lb": "internal"}}}})
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-gossip")]
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerIP"] == "203.0.113.7"
    assert svc["metadata"]["annotations"] == {"example.com/lb": "internal"}
    assert all("nodePort" not in p for p in svc["spec"]["ports"])
    cs, _ = containers(docs)
    assert "-advertise=203.0.113.7:7946" in cs["serf-agent"]["args"]
    assert "HOST_IP" not in env(cs["serf-agent"])

    # Off by default; and what cannot work is refused with the reason.
    assert not [s for s in by_kind(render({}), "Service") if s["metadata"]["name"].endswith("-gossip")]
    for values, msg in [
        ({"gossipService": {"enabled": True}}, "nodePort is required"),
        ({"gossipService": {"enabled": True, "type": "LoadBalancer"}}, "advertiseAddr is required"),
        ({"gossipService": {"enabled": True, "nodePort": 30946}, "advertiseAddr": "10.0.0.1"},
         "both set the advertised address"),
        ({"gossipService": {"enabled": True, "nodePort": 80}}, "nodePort"),
    ]:
        with pytest.raises(helm_python.HelmError, match=msg):
            render({"serf": values})
    with pytest.raises(helm_python.HelmError, match="with hostNetwork"):
        render({"hostNetwork": True, "serf": {"gossipService": {"enabled": True, "nodePort": 30946}}})
