"""Deployment files under deploy/: checked by real validators and against each other.

- Compose: the Compose specification's JSON schema, as vendored by
  check-jsonschema (pinned in requirements-dev.txt), through its CLI.
- Kubernetes: kubernetes-validate (pinned), which bundles the Kubernetes
  OpenAPI-derived JSON schemas, in strict mode (unknown fields are errors),
  against the oldest and the newest version it carries.
- nginx: Debian's `nginx -t`, and a real request through the compose config.
Docker and a cluster cannot run here; what the files promise to each other
(ports, probe paths that exist in the app, grace periods) is checked below.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import tornado.httpclient
import yaml

from settings import Settings
from tests.conftest import ACCESS_TOKEN, AUTH
from tests.procs import ROOT, Nginx, ServerProcess, free_port

COMPOSE = os.path.join(ROOT, "deploy/compose/compose.yaml")
COMPOSE_NGINX = os.path.join(ROOT, "deploy/compose/nginx.conf")
EXAMPLE_NGINX = os.path.join(ROOT, "deploy/nginx/chat_gpt_proxy.conf")
K8S_DIR = os.path.join(ROOT, "deploy/kubernetes")
K8S_FILES = sorted(os.path.join(K8S_DIR, f) for f in os.listdir(K8S_DIR) if f.endswith(".yaml"))
# Oldest and newest schemas kubernetes-validate 1.37.0 carries.
K8S_VERSIONS = ("1.25.0", "1.37.0")
# server.drain gives streams aborted at the end of SHUTDOWN_GRACE this long to end.
DRAIN_ABORT_WAIT = 3


def tool(name):
    return shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)


def run(cmd):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def k8s_docs():
    docs = {}
    for path in K8S_FILES:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                docs[doc["kind"]] = doc
    return docs


def seconds(text):
    match = re.fullmatch(r"(\d+)s", str(text))
    assert match, text
    return int(match.group(1))


# -- validators


def check_compose(path):
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", path])


def check_k8s(paths, version):
    return run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *paths])


def test_compose_file_matches_the_compose_specification():
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validator_rejects_a_mistake(tmp_path):
    """The validator really validates: a misspelt key fails."""
    broken = tmp_path / "compose.yaml"
    with open(COMPOSE) as f:
        broken.write_text(f.read().replace("stop_grace_period:", "stop_grace_periods:"))
    result = check_compose(str(broken))
    assert result.returncode != 0 and "stop_grace_periods" in result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_pass_strict_schema_validation(version):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(k8s_docs())
    result = check_k8s(K8S_FILES, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(K8S_FILES), result.stdout


def test_kubernetes_validator_rejects_a_mistake(tmp_path):
    broken = tmp_path / "deployment.yaml"
    with open(os.path.join(K8S_DIR, "deployment.yaml")) as f:
        broken.write_text(f.read().replace("readOnlyRootFilesystem:", "readOnlyRootFilesystm:"))
    result = check_k8s([str(broken)], K8S_VERSIONS[-1])
    assert result.returncode != 0 and "readOnlyRootFilesystm" in result.stdout + result.stderr


# -- Kubernetes: what the manifests promise each other and the app


def dockerfile_uid():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        return int(re.search(r"^USER (\d+)$", f.read(), re.M).group(1))


def test_kubernetes_deployment_is_locked_down_and_outlives_its_drain():
    docs = k8s_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(container["resources"]) == {"requests", "limits"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])

    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env({**env, "ACCESS_TOKEN": "x"})
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert settings.shutdown_delay + pre_stop > 0, "no time for endpoints to drop the pod before it stops listening"
    needed = pre_stop + settings.shutdown_delay + settings.shutdown_grace + DRAIN_ABORT_WAIT
    assert pod["terminationGracePeriodSeconds"] > needed
    # The access token comes from a Secret, never from the manifest.
    assert container["envFrom"] == [{"secretRef": {"name": "chat-gpt-proxy"}}]
    assert not {"ACCESS_TOKEN", "ACCESS_KEY"} & set(env)


def test_kubernetes_objects_point_at_each_other():
    docs = k8s_docs()
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [port] = container["ports"]
    assert port["containerPort"] == Settings().port
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


@pytest.mark.gen_test
async def test_probe_paths_answer_as_the_manifests_expect(proxy, app):
    """Readiness on the path that turns 503 when draining; liveness on one that does not."""
    [container] = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    ready, live = container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]
    compose_check = " ".join(load(COMPOSE)["x-proxy"]["healthcheck"]["test"])
    assert "http://127.0.0.1:%d%s" % (Settings().port, ready) in compose_check
    for path in (ready, live):
        assert (await proxy.request(path, method="GET", auth=False)).code == 200
    app.draining = True
    assert (await proxy.request(ready, method="GET", auth=False)).code == 503
    assert (await proxy.request(live, method="GET", auth=False)).code == 200


# -- Compose: what the files promise each other


def test_compose_services_addresses_and_grace_fit_together():
    compose = load(COMPOSE)
    services = compose["services"]
    proxies = {name: s for name, s in services.items() if name.startswith("proxy-")}
    assert len(proxies) >= 2
    with open(COMPOSE_NGINX) as f:
        nginx_conf = f.read()
    upstream = re.findall(r"^\s*server (\S+):(\d+) ", nginx_conf, re.M)
    assert sorted(upstream) == sorted((name, str(Settings().port)) for name in proxies)
    addresses = [s["networks"]["default"]["ipv4_address"] for s in services.values()]
    assert len(set(addresses)) == len(addresses)
    subnet = compose["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert all(a.startswith(subnet.rsplit(".", 1)[0] + ".") for a in addresses)
    nginx_address = services["nginx"]["networks"]["default"]["ipv4_address"]
    listen = re.search(r"^\s*listen (\d+);", nginx_conf, re.M).group(1)
    assert services["nginx"]["ports"] == ["8080:%s" % listen]
    assert "http://127.0.0.1:%s/healthz" % listen in services["nginx"]["healthcheck"]["test"]
    for service in proxies.values():
        env = service["environment"]
        assert env["TRUSTED_PROXIES"] == nginx_address
        assert service["env_file"] == ["proxy.env"] and not {"ACCESS_TOKEN", "ACCESS_KEY"} & set(env)
        settings = Settings.from_env({**env, "ACCESS_TOKEN": "x"})
        needed = settings.shutdown_delay + settings.shutdown_grace + DRAIN_ABORT_WAIT
        assert seconds(service["stop_grace_period"]) > needed
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--save") + 1] == "" and redis[redis.index("--appendonly") + 1] == "no"
    # The instances share their limits through that Redis.
    for service in proxies.values():
        url = service["environment"]["REDIS_URL"]
        assert url == "redis://redis:6379/0" and Settings.from_env({"REDIS_URL": url}).redis_url == url
        assert "redis" in service["depends_on"]
    # ...and one usage ledger in that PostgreSQL, kept on a volume.
    postgres = services["postgres"]
    for service in proxies.values():
        url = service["environment"]["USAGE_DATABASE"]
        assert Settings.from_env({"USAGE_DATABASE": url}).usage_database == url
        assert url == "postgresql://%s@postgres:5432/%s" % (
            postgres["environment"]["POSTGRES_USER"],
            postgres["environment"]["POSTGRES_DB"],
        )
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "ports" not in postgres  # trust authentication: reachable only on the compose network
    volume = postgres["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data" and volume[0] in compose["volumes"]
    # The example env file holds every variable a proxy needs, and is the only place of the token.
    with open(os.path.join(ROOT, "deploy/compose/proxy.env.example")) as f:
        example = dict(line.split("=", 1) for line in f.read().splitlines() if line and not line.startswith("#"))
    Settings.from_env(example)
    assert "ACCESS_TOKEN" in example
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "deploy/compose/proxy.env" in f.read().split()


def nginx_blocks(path):
    """The directives of the map, the upstream (without addresses) and the locations, comments dropped."""
    with open(path) as f:
        lines = [line.split("#")[0].strip() for line in f]
    lines = [line for line in lines if line]
    out = []
    for line in lines:
        if line.startswith(("listen", "ssl_", "server_name", "server {")):
            continue
        out.append(re.sub(r"^server \S+ ", "server ADDRESS ", line))
    return out


def test_compose_nginx_uses_the_example_configs_settings():
    example, compose = nginx_blocks(EXAMPLE_NGINX), nginx_blocks(COMPOSE_NGINX)
    assert example == compose


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_compose_nginx_config_runs_in_front_of_two_instances(fake_openai, tmp_path):
    servers = []
    try:
        for i in range(2):
            server = ServerProcess(
                {"ACCESS_TOKEN": ACCESS_TOKEN, "OPENAI_BASE_URL": fake_openai.url}, str(tmp_path / ("p%d.log" % i))
            )
            servers.append(server)
            await server.wait_ready()
        with open(COMPOSE_NGINX) as f:
            site = f.read()
        port = free_port()
        site = re.sub(r"listen \d+;", "listen 127.0.0.1:%d;" % port, site)
        for i, server in enumerate(servers):
            site = site.replace("proxy-%d:9081" % (i + 1), "127.0.0.1:%d" % server.port)
        nginx = Nginx(site, tmp_path / "nginx", port)
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        try:
            for i in range(4):
                response = await client.fetch(
                    "http://127.0.0.1:%d/chat_complete" % port,
                    method="POST",
                    headers=AUTH,
                    body=json.dumps({"prompt": "compose %d" % i}),
                )
                assert json.loads(response.body)["text"] == "Echo: compose %d" % i
        finally:
            client.close()
            nginx.stop()
        # Round robin: both instances served.
        assert all("path=/chat_complete" in s.output() for s in servers)
    finally:
        for server in servers:
            server.stop()
