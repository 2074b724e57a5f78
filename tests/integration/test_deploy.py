"""deploy/ and loadtest/, proved as far as this machine can run them (no Docker engine, no GPU):

* docker-compose (Debian's 1.29) validates deploy/docker-compose.yml; the engine commands in it parse
  with vLLM's own argument parser and name Top-H classes that exist;
* promtool validates deploy/prometheus/prometheus.yml, and a real Prometheus server running that
  config (targets pointed at the `served` gateway and engine) scrapes them;
* every Grafana dashboard query names a metric family the live gateway or vLLM exports, and evaluates
  in that Prometheus;
* a short locust run against the gateway completes without errors and report.py summarises it.

The tools come from `make system-deps`; when missing, tests fail (they do not skip).
"""
from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.support.compose import COMPOSE, DEPLOY, ROOT, compose_config, run, seconds, tool
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "leanserve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "leanserve.yml"
MODEL = "SmolLM2-135M-Instruct"


# --- compose ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_defaults(tmp_path_factory):
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    return compose_config(empty)  # every variable at its default


@pytest.fixture(scope="module")
def compose(compose_defaults):
    with_env = compose_config(DEPLOY / ".env.example")
    assert set(compose_defaults["services"]) == set(with_env["services"])
    return with_env


def test_compose_gpu_engines(compose):
    svc = compose["services"]
    assert svc["engine"]["profiles"] == ["gpu"] and svc["engine-2"]["profiles"] == ["replica2"]
    for name in ("engine", "engine-2"):
        e = svc[name]
        assert e["build"]["target"] == "gpu" and e["build"]["args"]["VLLM_IMAGE"] == "vllm/vllm-openai:v0.32.0"
        (dev,) = e["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
        assert e["ipc"] == "host"
        assert any(v.endswith(":/root/.cache/huggingface:rw") for v in e["volumes"]), e["volumes"]
        assert seconds(e["healthcheck"]["start_period"]) >= 600, "model download + load needs a long start period"
        assert "/health" in " ".join(e["healthcheck"]["test"])
        assert "--logits-processors kernels.vllm_plugin.top_h:TopHV2" in e["command"]
        assert "engines" in e["networks"]["default"]["aliases"]
    assert svc["engine"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] != \
        svc["engine-2"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]


def test_compose_cpu_profile_runs_the_same_stack(compose):
    svc = compose["services"]
    cpu = svc["engine-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu
    assert "--enforce-eager" in cpu["command"] and "kernels.vllm_plugin.top_h:TopHV1" in cpu["command"]
    assert {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"} <= set(cpu["environment"])
    assert {"engine", "engines"} <= set(cpu["networks"]["default"]["aliases"])
    # One gateway per flavour, each waiting for its engine to be healthy; same settings otherwise.
    gpu_gw, cpu_gw = svc["gateway"], svc["gateway-cpu"]
    assert gpu_gw["depends_on"] == {"engine": {"condition": "service_healthy"}}
    assert cpu_gw["depends_on"] == {"engine-cpu": {"condition": "service_healthy"}}
    assert gpu_gw["environment"] == cpu_gw["environment"]
    assert gpu_gw["environment"]["LEANSERVE_ENGINES"] == "http://engine:8000"
    assert {"LEANSERVE_API_KEYS", "LEANSERVE_MAX_CONCURRENCY", "LEANSERVE_MAX_QUEUE"} <= set(gpu_gw["environment"])
    assert gpu_gw["build"]["dockerfile"] == "deploy/Dockerfile.gateway"
    for name in ("gateway", "prometheus", "grafana"):
        assert name in svc
    assert "profiles" not in svc["prometheus"] and "profiles" not in svc["grafana"]
    mounts = {v.split(":")[1] for v in svc["prometheus"]["volumes"]}
    assert "/etc/prometheus/prometheus.yml" in mounts
    mounts = {v.split(":")[0]: v.split(":")[1] for v in svc["grafana"]["volumes"]}
    assert mounts[str(DEPLOY / "grafana" / "provisioning")] == "/etc/grafana/provisioning"
    dash_dir = mounts[str(DEPLOY / "grafana" / "dashboards")]
    assert yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"] == dash_dir


def test_compose_validation_can_fail(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("capabilities: [gpu]", "capability: [gpu]", 1))
    p = run([tool("docker-compose"), "-f", str(broken), "config"], cwd=tmp_path)
    assert p.returncode != 0 and "capability" in p.stderr


def test_dockerfiles_install_leanserve_the_way_compose_runs_it():
    gateway = (DEPLOY / "Dockerfile.gateway").read_text()
    assert "FROM python:3.11-slim" in gateway and "pip install ." in gateway
    assert "[engine" not in gateway, "the gateway image must not pull torch/vLLM"
    engine = (DEPLOY / "Dockerfile.engine").read_text()
    assert re.search(r"^FROM \$\{VLLM_IMAGE\} AS gpu$", engine, re.M)
    assert "ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0" in engine
    assert re.search(r"^FROM python:3.11-slim AS cpu$", engine, re.M)


def test_engine_commands_parse_with_vllms_own_parser(compose, compose_defaults):
    """The flags compose passes to each engine (with .env.example and with the defaults) are accepted
    by vLLM 0.32's server parser, and the Top-H classes they name exist (run in a child: importing
    vLLM here would slow every test)."""
    commands = {f"{name}{suffix}": cfg["services"][name]["command"]
                for suffix, cfg in (("", compose), (" (defaults)", compose_defaults))
                for name in ("engine", "engine-2", "engine-cpu")}
    code = r"""
import importlib, json, shlex, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
parser = make_arg_parser(FlexibleArgumentParser())
out = {}
for name, cmd in json.loads(sys.argv[1]).items():
    args = parser.parse_args(shlex.split(cmd))
    validate_parsed_serve_args(args)
    for spec in args.logits_processors:
        mod, _, cls = spec.partition(":")
        getattr(importlib.import_module(mod), cls)
    out[name] = {"model": args.model, "port": args.port, "host": args.host, "enforce_eager": args.enforce_eager,
                 "logits_processors": args.logits_processors}
print(json.dumps(out))
"""
    p = run([sys.executable, "-c", code, json.dumps(commands)], timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    parsed = json.loads(p.stdout.strip().splitlines()[-1])
    assert parsed["engine-cpu"]["enforce_eager"] is True
    assert parsed["engine-cpu"]["logits_processors"] == ["kernels.vllm_plugin.top_h:TopHV1"]
    assert parsed["engine"]["logits_processors"] == ["kernels.vllm_plugin.top_h:TopHV2"]
    assert {(v["host"], v["port"]) for v in parsed.values()} == {("0.0.0.0", 8000)}


# --- prometheus config and grafana provisioning ---------------------------------------------------------

def test_promtool_validates_prometheus_config(tmp_path):
    p = run([tool("promtool"), "check", "config", str(PROM_CONFIG)])
    assert p.returncode == 0, p.stdout + p.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(PROM_CONFIG.read_text().replace("scrape_interval: 5s", "scrape_interval: five seconds"))
    assert run([tool("promtool"), "check", "config", str(broken)]).returncode != 0


def test_grafana_provisioning_and_dashboard_are_consistent():
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in dash["panels"] if p["type"] != "row"]
    for p in graphs:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["datasource"]["uid"] == ds["uid"] for t in p["targets"])
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
    titles = " ".join(p["title"].lower() for p in graphs)
    for needed in ("time to first token", "inter-token", "end-to-end", "tokens/s", "queue", "rejections",
                   "kv cache", "trimmed"):
        assert needed in titles, needed


# --- dashboard queries → metric families ------------------------------------------------------------------

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, aggregations, label names, durations and
    Grafana variables are not names)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # string literals (label values)
    e = re.sub(r"\{[^}]*\}", "", e)                      # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                     # range and subquery selectors
    e = _GROUPING.sub(" ", e)                            # by (...), on (...), group_left (...)
    return {m.group(1) for m in _IDENT.finditer(e) if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


def test_metric_names_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(x_seconds_bucket{model=~"a.*"}[$__rate_interval])))') \
        == {"x_seconds_bucket"}
    assert metric_names("sum(rate(vllm:generation_tokens_total[5m])) / sum without (instance) (up)") \
        == {"vllm:generation_tokens_total", "up"}
    assert metric_names('a_total{status!~"2.."} offset 5m and on (job) group_left (x) b > bool 1e3') == {"a_total", "b"}
    assert metric_names("vllm:kv_cache_usage_perc") == {"vllm:kv_cache_usage_perc"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def exported_names(exposition: str) -> set[str]:
    """Every sample name a /metrics page can produce: the samples present, plus each declared family's
    names (a labelled family with no child yet has a # TYPE line but no sample)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(None, 3)
            typ = typ.strip()
            if typ == "counter":
                base = name[:-len("_total")] if name.endswith("_total") else name
                names |= {base + "_total", base + "_created"}
            elif typ == "histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
            elif typ == "summary":
                names |= {name, name + "_sum", name + "_count", name + "_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^{\s]+", line).group(0))
    return names


def family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|created)$", "", name)


@pytest.fixture(scope="module")
def traffic(served):
    """Some real requests through the gateway: streamed and not, chat and completions, and a 404."""
    with httpx.Client(base_url=served.url, timeout=120) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Say hi"}]})
        assert r.status_code == 200, r.text
        with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 8, "stream": True, "top_h": 0.9,
                "messages": [{"role": "user", "content": "Count to five"}]}) as s:
            assert s.status_code == 200
            assert b"[DONE]" in b"".join(s.iter_bytes())
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Paris is", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert c.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
    return served


def scrape(url: str) -> str:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    return r.text


def test_dashboard_queries_reference_exported_families(traffic):
    gateway, engine = scrape(traffic.url), scrape(traffic.engine_url)
    exported = exported_names(gateway) | exported_names(engine)
    assert "leanserve_requests_total" in exported and "vllm:kv_cache_usage_perc" in exported  # the scrape worked
    referenced = {n for _, expr in dashboard_exprs() for n in metric_names(expr)}
    assert referenced, "no metric names found in the dashboard"
    missing = {}
    for title, expr in dashboard_exprs():
        for name in metric_names(expr) - exported:
            missing.setdefault(family(name), []).append(title)
    assert not missing, f"dashboard queries name families neither the gateway nor vLLM exports: {missing}"


# --- a real Prometheus server ------------------------------------------------------------------------------

class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, q: str) -> dict:
        r = httpx.get(self.url + "/api/v1/query", params={"query": q}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{q}: {r.status_code} {body}"
        return body["data"]

    def wait_for(self, q: str, ok, timeout: float = 60) -> list:
        t0 = time.monotonic()
        while True:
            result = self.query(q)["result"]
            if ok(result):
                return result
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"Prometheus: {q} gave {result} after {timeout:g}s")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(traffic, tmp_path_factory):
    """Debian's Prometheus running deploy/prometheus/prometheus.yml, its targets pointed at the live
    gateway and engine (no Docker DNS here) and scraping every second."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    targets = {"gateway": urlsplit(traffic.url).netloc, "engine": urlsplit(traffic.engine_url).netloc}
    assert {j["job_name"] for j in config["scrape_configs"]} == set(targets)
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    tmp = tmp_path_factory.mktemp("prometheus")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
            try:
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 60:
                pytest.fail("prometheus was not ready within 60 s")
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def counter_sum(exposition: str, name: str) -> float:
    return sum(float(line.rsplit(None, 1)[1]) for line in exposition.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_prometheus_scrapes_gateway_and_engine(prometheus, traffic):
    up = prometheus.wait_for("up", lambda r: len(r) == 2 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["job"] for s in up} == {"gateway", "engine"}
    r = httpx.post(traffic.url + "/v1/completions", json={"model": MODEL, "prompt": "One, two,", "max_tokens": 2},
                   timeout=120)
    assert r.status_code == 200
    # What the gateway counts now (this request included) must come back through Prometheus's API.
    expected = counter_sum(scrape(traffic.url), "leanserve_requests_total")
    assert expected > 0
    prometheus.wait_for('sum(leanserve_requests_total{job="gateway"})',
                        lambda res: res and float(res[0]["value"][1]) >= expected)
    result = prometheus.query('leanserve_requests_total{endpoint="completions",status="200"}')["result"]
    assert result and result[0]["metric"]["model"] == MODEL and float(result[0]["value"][1]) >= 2
    prometheus.wait_for('vllm:num_requests_running{job="engine"}', lambda res: len(res) >= 1)


def test_dashboard_queries_evaluate_in_prometheus(prometheus):
    """Every query is valid PromQL for the real server; a query whose families all have live samples
    must return data (so label matchers and suffixes are right, not only names)."""
    prometheus.wait_for('count_over_time(up{job="gateway"}[1m])', lambda r: r and float(r[0]["value"][1]) >= 3)
    present = {s["__name__"] for s in httpx.get(prometheus.url + "/api/v1/series", timeout=10,
                                                 params={"match[]": '{job=~".+"}'}).json()["data"]}
    empty = []
    for title, expr in dashboard_exprs():
        q = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
        assert "$" not in q, f"{title}: unhandled Grafana variable in {expr}"
        data = prometheus.query(q)
        if metric_names(expr) <= present and not data["result"]:
            empty.append((title, expr))
    assert not empty, f"queries over exported series returned nothing: {empty}"


# --- locust + report ------------------------------------------------------------------------------------

def test_locust_run_and_report(traffic, tmp_path):
    """A short, bounded headless locust run against the gateway: no failures, custom SSE events
    recorded, and report.py turns its samples into Markdown/CSV/PNG."""
    samples = tmp_path / "samples.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
           "-u", "2", "-r", "2", "-t", "8s", "--stop-timeout", "60", "--host", traffic.url, "--only-summary",
           "--csv", str(tmp_path / "locust"), "--max-tokens", "8-16", "--samples-file", str(samples),
           "--top-h", "0.9", "--ignore-eos"]
    p = run(cmd, timeout=240, cwd=ROOT)
    assert p.returncode == 0, f"{shlex.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    stats = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "locust_stats.csv"))}
    assert {"TTFT", "ITL", "TPOT", "E2E", "/v1/chat/completions"} <= set(stats), sorted(stats)
    assert int(stats["Aggregated"]["Failure Count"]) == 0
    n = int(stats["E2E"]["Request Count"])  # the CSV is written before --stop-timeout's last requests end
    assert n >= 1 and n == int(stats["/v1/chat/completions"]["Request Count"])
    r = run([sys.executable, "-m", "loadtest.report", str(samples), "--out", str(tmp_path / "out"),
             "--fail-on-errors"], timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    assert summary["succeeded"] == summary["requests"] >= max(n, 2) and summary["failed"] == 0
    # --ignore-eos with max_tokens 8-16: every request generates 8 to 16 tokens.
    tokens = [json.loads(line)["output_tokens"] for line in samples.read_text().splitlines()]
    assert all(8 <= t <= 16 for t in tokens), tokens
    assert summary["output_tokens"] == sum(tokens) and summary["latency"]["itl"]["n"] > 0
    assert 0 < summary["latency"]["ttft"]["p50"] <= summary["latency"]["e2e"]["p50"]
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
