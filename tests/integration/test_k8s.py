"""deploy/k8s, proved without a cluster: every overlay renders with `kubectl kustomize`, every object
validates in strict mode (Kubernetes schemas through kubernetes-validate; custom resources through the
CRD schemas in data/k8s-crds), the manifests agree with deploy/docker-compose.yml and the Dockerfiles
(images, ports, probes, env, engine command), and the pieces point at each other (the gateway's DNS
name at the headless Service, monitors at pods and ports, the InferencePool at its picker and pods).

Needs kubectl, docker-compose and promtool (`make system-deps`); no vLLM, no cluster, no network.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
import stat
import subprocess
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.config import Settings
from tests.support.compose import DEPLOY, compose_config, run, seconds, tool
from tests.support.k8s import Validator, render

K8S = DEPLOY / "k8s"
OVERLAYS = ("gpu", "cpu", "llm-d")
CUSTOM = {"gpu": {"PodMonitor", "ServiceMonitor"}, "cpu": {"PodMonitor", "ServiceMonitor"},
          "llm-d": {"PodMonitor", "ServiceMonitor", "InferencePool", "Gateway", "HTTPRoute"}}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator()


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    return compose_config(empty)["services"]  # every variable at its default


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def container(objs: list[dict], deployment: str) -> dict:
    (c,) = one(objs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return c


def configmap_env(objs: list[dict], c: dict) -> dict[str, str]:
    """What envFrom gives the container (the generated ConfigMaps, by their rendered names)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(one(objs, "ConfigMap", src["configMapRef"]["name"])["data"])
    return env


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- rendering and strict validation --------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(rendered, validator, overlay):
    against = {}
    for obj in rendered[overlay]:
        against[(obj["kind"], obj["metadata"]["name"])] = validator.validate(obj)
    custom = {kind for (kind, _), src in against.items() if not src.startswith("Kubernetes")}
    assert custom == CUSTOM[overlay]
    assert {src for src in against.values() if src.startswith("Kubernetes")} == {"Kubernetes 1.37"}
    assert all(o["metadata"].get("namespace") == "leanserve" for o in rendered[overlay] if o["kind"] != "Namespace")


def test_the_default_is_the_gpu_overlay(rendered):
    assert render(K8S) == rendered["gpu"]


def test_strict_validation_rejects_what_an_api_server_would(rendered, validator):
    objs = rendered["llm-d"]

    def rejected(kind: str, name: str, edit) -> None:
        obj = copy.deepcopy(one(objs, kind, name))
        edit(obj)
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(obj)

    c0 = lambda o: o["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    rejected("Deployment", "leanserve-engine", lambda o: c0(o).update(livenessprobe=c0(o).pop("livenessProbe")))
    rejected("HorizontalPodAutoscaler", "leanserve-gateway", lambda o: o["spec"].update(minReplicas="two"))
    rejected("InferencePool", "leanserve-engine-pool", lambda o: o["spec"].update(targetPort=[{"number": 8000}]))
    rejected("InferencePool", "leanserve-engine-pool", lambda o: o["spec"]["targetPorts"][0].update(number=70000))
    rejected("InferencePool", "leanserve-engine-pool", lambda o: o["metadata"].update(label={"a": "b"}))
    rejected("PodMonitor", "leanserve-engine",
             lambda o: o["spec"].update(podMetricEndpoints=o["spec"].pop("podMetricsEndpoints")))
    rejected("HTTPRoute", "leanserve-engine-pool", lambda o: o["spec"]["rules"][0]["timeouts"].update(request=5))
    rejected("Gateway", "leanserve-inference-gateway", lambda o: o["spec"]["listeners"][0].update(protocol=1))
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validator.validate({"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "x"}})


# --- agreement with docker-compose and the Dockerfiles ---------------------------------------------------

def healthcheck(dockerfile: str) -> tuple[dict[str, str], str]:
    """The HEALTHCHECK options and its CMD."""
    text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
    options, cmd = re.search(r"^HEALTHCHECK (.*?) CMD (.*)$", text, re.M).groups()
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), cmd


def entrypoint(dockerfile: str, stage: str) -> list[str]:
    text = (DEPLOY / dockerfile).read_text()
    if stage:
        text = text[text.index(f" AS {stage}"):]
    return yaml.safe_load(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))


@pytest.mark.parametrize("overlay,service,target", [("gpu", "engine", "gpu"), ("cpu", "engine-cpu", "cpu")])
def test_engines_match_compose(rendered, compose, overlay, service, target):
    objs, svc = rendered[overlay], compose[service]
    c = container(objs, "leanserve-engine")
    assert c["image"] == svc["image"]
    assert [p["containerPort"] for p in c["ports"]] == [int(p) for p in svc["expose"]]
    hc = svc["healthcheck"]
    assert f"127.0.0.1:{c['ports'][0]['containerPort']}/health" in " ".join(hc["test"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert c[probe]["timeoutSeconds"] == seconds(hc["timeout"])
    live, start = c["livenessProbe"], c["startupProbe"]
    assert (live["periodSeconds"], live["failureThreshold"]) == (seconds(hc["interval"]), hc["retries"])
    assert start["periodSeconds"] * start["failureThreshold"] == seconds(hc["start_period"])
    env = configmap_env(objs, c)
    for k, v in svc["environment"].items():
        if k == "HF_TOKEN":  # a Secret in Kubernetes, optional as the empty default is in compose
            (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == k]
            assert ref["optional"] is True
        else:
            assert env[k] == str(v), k
    assert any(v["mountPath"] == "/root/.cache/huggingface" for v in c["volumeMounts"])  # compose's "models"
    assert "--shutdown-timeout" in svc["command"] and env["ENGINE_SHUTDOWN_TIMEOUT"] == \
        shlex.split(svc["command"])[shlex.split(svc["command"]).index("--shutdown-timeout") + 1]
    assert entrypoint("Dockerfile.engine", target)[1:] == ["-m", "vllm.entrypoints.openai.api_server"]


def engine_argv(c: dict, env: dict[str, str], tmp_path) -> list[str]:
    """Run the engine container's own command in sh, with `python3` a stub that records its argv."""
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_OUT"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "argv"
    p = subprocess.run(c["command"] + c["args"], env={**env, "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                                       "ARGV_OUT": str(out)}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    argv = out.read_text().split("\0")[:-1]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    return argv[2:]


def flags(argv: list[str]) -> dict[str, list[str]]:
    """--flag value... pairs, order-free (compose and the ConfigMap place extra flags differently)."""
    out: dict[str, list[str]] = {}
    key = None
    for tok in argv:
        if tok.startswith("--"):
            key = tok
            out.setdefault(key, [])
        else:
            assert key is not None, argv
            out[key].append(tok)
    return out


EXTRA = """--max-model-len 4096 --override-generation-config '{"temperature": 0.5}'"""


@pytest.mark.parametrize("overlay,service,compose_var", [("gpu", "engine", "ENGINE_ARGS"),
                                                          ("cpu", "engine-cpu", "CPU_ENGINE_ARGS")])
def test_engine_command_is_composes(rendered, compose, tmp_path, overlay, service, compose_var):
    c = container(rendered[overlay], "leanserve-engine")
    env = configmap_env(rendered[overlay], c)
    assert flags(engine_argv(c, env, tmp_path)) == flags(shlex.split(compose[service]["command"]))
    # Extra flags, quoted ones too, split the same way in both.
    env_file = tmp_path / "extra.env"
    env_file.write_text(f"{compose_var}={EXTRA}\n")
    with_extra = compose_config(env_file)["services"][service]["command"]
    cpu_flags = "--dtype float32 --enforce-eager " if overlay == "cpu" else ""
    k8s_argv = engine_argv(c, {**env, "ENGINE_ARGS": cpu_flags + EXTRA}, tmp_path)
    assert flags(k8s_argv) == flags(shlex.split(with_extra))
    assert flags(k8s_argv)["--override-generation-config"] == ['{"temperature": 0.5}']


def test_gateway_matches_compose(rendered, compose):
    svc = compose["gateway"]
    objs = rendered["gpu"]
    c = container(objs, "leanserve-gateway")
    assert c["image"] == svc["image"]
    assert [p["containerPort"] for p in c["ports"]] == [p["target"] for p in svc["ports"]]
    env = configmap_env(objs, c)
    secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert set(secret) == {"LEANSERVE_API_KEYS"} and secret["LEANSERVE_API_KEYS"]["name"] == "leanserve-api-keys"
    compose_env = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in svc["environment"].items()}
    # The same knobs with the same defaults; only the way to the engines differs (DNS instead of a URL list).
    assert set(env) | set(secret) == (set(compose_env) - {"LEANSERVE_ENGINES"}) | {"LEANSERVE_ENGINE_DNS"}
    assert {k: v for k, v in env.items() if k != "LEANSERVE_ENGINE_DNS"} == \
        {k: v for k, v in compose_env.items() if k in env}
    for k in env:
        assert k.removeprefix("LEANSERVE_").lower() in Settings.model_fields, k
    hc, cmd = healthcheck("Dockerfile.gateway")
    live = c["livenessProbe"]
    assert live["httpGet"] == {"path": "/health", "port": "http"} and f":{c['ports'][0]['containerPort']}/health'" in cmd
    assert (live["periodSeconds"], live["timeoutSeconds"], live["failureThreshold"], live["initialDelaySeconds"]) == \
        (seconds(hc["interval"]), seconds(hc["timeout"]), int(hc["retries"]), seconds(hc["start-period"]))
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    uid = re.search(r"useradd .*--uid (\d+)", (DEPLOY / "Dockerfile.gateway").read_text()).group(1)
    assert one(objs, "Deployment", "leanserve-gateway")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_engines_have_time_to_drain(rendered, compose):
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        pod = one(objs, "Deployment", "leanserve-engine")["spec"]["template"]["spec"]
        c = container(objs, "leanserve-engine")
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        drain = int(configmap_env(objs, c)["ENGINE_SHUTDOWN_TIMEOUT"])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    for name in ("engine", "engine-cpu"):
        assert seconds(compose[name]["stop_grace_period"]) > 300


def test_gateways_have_time_to_drain(rendered, compose):
    from server.config import Settings
    grace = Settings.model_fields["shutdown_grace"].default + 5 + 5  # + cut streams' endings + uvicorn's close
    for overlay in OVERLAYS:
        pod = one(rendered[overlay], "Deployment", "leanserve-gateway")["spec"]["template"]["spec"]
        pre_stop = int(container(rendered[overlay], "leanserve-gateway")["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    for name in ("gateway", "gateway-cpu"):
        assert seconds(compose[name]["stop_grace_period"]) > grace


# --- the pieces point at each other ------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_gateways_discover_the_engines_through_the_headless_service(rendered, overlay):
    objs = rendered[overlay]
    gw = container(objs, "leanserve-gateway")
    env = configmap_env(objs, gw)
    settings = Settings(**{k.removeprefix("LEANSERVE_").lower(): v for k, v in env.items()})
    assert settings.engines == [] and len(settings.engine_dns) == 1
    name, port = settings.engine_dns[0].rsplit(":", 1)
    svc = one(objs, "Service", name)
    assert svc["spec"]["clusterIP"] == "None" and not svc["spec"].get("publishNotReadyAddresses")
    (sp,) = svc["spec"]["ports"]
    engine = one(objs, "Deployment", "leanserve-engine")["spec"]["template"]
    assert matches(svc["spec"]["selector"], engine["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in engine["spec"]["containers"][0]["ports"]}
    # A headless Service's DNS gives pod IPs: the gateway must dial the container port itself.
    assert int(port) == sp["port"] == ports[sp["targetPort"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitors_select_the_pods_and_ports(rendered, overlay):
    objs = rendered[overlay]
    engine = one(objs, "Deployment", "leanserve-engine")["spec"]["template"]
    pm = one(objs, "PodMonitor", "leanserve-engine")["spec"]
    assert [d["metadata"]["name"] for d in objs if d["kind"] == "Deployment"
            and matches(pm["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])] == ["leanserve-engine"]
    assert {e["port"] for e in pm["podMetricsEndpoints"]} <= {p["name"] for p in engine["spec"]["containers"][0]["ports"]}
    sm = one(objs, "ServiceMonitor", "leanserve-gateway")["spec"]
    (svc,) = [o for o in objs if o["kind"] == "Service" and matches(sm["selector"]["matchLabels"], o["metadata"]["labels"])]
    assert svc["metadata"]["name"] == "leanserve-gateway"  # one Service per pod set: no pod scraped twice
    assert {e["port"] for e in sm["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    dash = one(objs, "ConfigMap", "leanserve-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["data"] == {"leanserve.json": (DEPLOY / "grafana" / "dashboards" / "leanserve.json").read_text()}


def test_gpu_and_cpu_engines(rendered):
    gpu, cpu = (container(rendered[o], "leanserve-engine") for o in ("gpu", "cpu"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in str(cpu["resources"])
    pod = one(rendered["gpu"], "Deployment", "leanserve-engine")["spec"]["template"]["spec"]
    (cache,) = [v for v in pod["volumes"] if v["name"] == "model-cache"]
    pvc = one(rendered["gpu"], "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica, on any node, shares the download
    assert configmap_env(rendered["cpu"], cpu)["MODEL"] == "/models/SmolLM2-135M-Instruct"  # baked into the image


def test_llm_d_wiring(rendered):
    objs = rendered["llm-d"]
    pool = one(objs, "InferencePool")
    engine = one(objs, "Deployment", "leanserve-engine")["spec"]["template"]
    assert matches(pool["spec"]["selector"]["matchLabels"], engine["metadata"]["labels"])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == \
        [p["containerPort"] for p in engine["spec"]["containers"][0]["ports"]]
    # The picker: its Service and port, its pod watching this pool with the plugins it mounts.
    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = one(objs, "Service", ref["name"])
    (svc_port,) = [p for p in epp_svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    epp = one(objs, "Deployment", "leanserve-epp")["spec"]["template"]
    assert matches(epp_svc["spec"]["selector"], epp["metadata"]["labels"])
    epp_c = epp["spec"]["containers"][0]
    assert svc_port["targetPort"] in {p["name"] for p in epp_c["ports"]}
    args = dict(a.removeprefix("--").split("=", 1) for a in epp_c["args"])
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-group"] == pool["apiVersion"].split("/")[0]
    (mount,) = epp_c["volumeMounts"]
    (vol,) = [v for v in epp["spec"]["volumes"] if v["name"] == mount["name"]]
    plugins = one(objs, "ConfigMap", vol["configMap"]["name"])["data"]
    assert args["config-file"] == f"{mount['mountPath']}/{next(iter(plugins))}"
    assert yaml.safe_load(next(iter(plugins.values())))["kind"] == "EndpointPickerConfig"
    rules = {(g, r) for rule in one(objs, "Role", "leanserve-epp")["rules"]
             for g in rule["apiGroups"] for r in rule["resources"] if "watch" in rule["verbs"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= rules
    assert one(objs, "ServiceAccount", epp["spec"]["serviceAccountName"])
    # The route from the inference Gateway to the pool, and the leanserve gateway's way to that Gateway.
    route, gateway = one(objs, "HTTPRoute")["spec"], one(objs, "Gateway")
    assert [p["name"] for p in route["parentRefs"]] == [gateway["metadata"]["name"]]
    assert route["rules"][0]["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                 "name": pool["metadata"]["name"]}]
    env = configmap_env(objs, container(objs, "leanserve-gateway"))
    settings = Settings(**{k.removeprefix("LEANSERVE_").lower(): v for k, v in env.items()})
    assert settings.engine_dns == [] and len(settings.engines) == 1
    url = urlsplit(settings.engines[0])
    # Istio names the Service of a Gateway "<gateway>-istio" (the class name).
    assert url.hostname == f"{gateway['metadata']['name']}-{gateway['spec']['gatewayClassName']}"
    assert url.port == gateway["spec"]["listeners"][0]["port"]


# --- plain Prometheus (no operator) -----------------------------------------------------------------------------

PROM = K8S / "prometheus" / "prometheus.yml"


def test_plain_prometheus_config_finds_every_pod_by_dns(rendered, tmp_path):
    p = run([tool("promtool"), "check", "config", str(PROM)])
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = {j["job_name"]: j["dns_sd_configs"] for j in yaml.safe_load(PROM.read_text())["scrape_configs"]}
    assert set(jobs) == {"leanserve-gateway", "leanserve-engine"}
    for overlay in OVERLAYS:
        objs = rendered[overlay]
        for job, sds in jobs.items():
            (sd,) = sds
            (fqdn,) = sd["names"]
            name, namespace, suffix = fqdn.split(".")
            svc = one(objs, "Service", name)
            assert (suffix, namespace) == ("svc", svc["metadata"]["namespace"])
            assert svc["spec"]["clusterIP"] == "None"  # one A record per pod, not a virtual IP
            pods = [o for o in objs if o["kind"] == "Deployment"
                    and matches(svc["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])]
            assert [d["metadata"]["name"] for d in pods] == [job]
            ports = {p["name"]: p["containerPort"] for p in pods[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert sd["port"] == ports["http"]
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROM.read_text().replace("type: A", "type: AAAAA", 1))
    assert run([tool("promtool"), "check", "config", str(broken)]).returncode != 0


def test_shipped_crds_are_the_documented_upstream_files():
    import hashlib

    from tests.support.k8s import CRD_DIR

    readme = (CRD_DIR / "README.md").read_text()
    listed = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    assert listed and set(listed) == {f.name for f in CRD_DIR.glob("*.yaml")}
    for name, digest in listed.items():
        assert hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest() == digest, name
    versions = {name: re.search(rf"`{re.escape(name)}` \| [^|]+ \| [^|]+ (v?[\d.]+) ", readme).group(1).lstrip("v")
                for name in listed}
    for name, version in versions.items():
        annotations = yaml.safe_load((CRD_DIR / name).read_text())["metadata"]["annotations"]
        assert version in {v.lstrip("v") for k, v in annotations.items() if k.endswith("version")}, name


def test_the_readme_example_kustomization_renders(tmp_path):
    """README "Deploy on Kubernetes": a kustomization of one's own over an overlay, images and model set."""
    import shutil

    from tests.support.compose import ROOT

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n# my-leanserve/kustomization.yaml\n(.*?)```", text, re.S).group(1)
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    shutil.copytree(DEPLOY / "grafana", tmp_path / "deploy" / "grafana")
    (tmp_path / "my-leanserve").mkdir()
    (tmp_path / "my-leanserve" / "kustomization.yaml").write_text(block)
    objs = render(tmp_path / "my-leanserve")
    spec = yaml.safe_load(block)
    images = {f"{i['newName']}:{i['newTag']}" for i in spec["images"]}
    assert {container(objs, d)["image"] for d in ("leanserve-engine", "leanserve-gateway")} == images
    env = configmap_env(objs, container(objs, "leanserve-engine"))
    for literal in spec["configMapGenerator"][0]["literals"]:
        k, v = literal.split("=", 1)
        assert env[k] == v
