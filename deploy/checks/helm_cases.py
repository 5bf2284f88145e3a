#!/usr/bin/env python3
"""Behaviour of the chart's template logic: renders helm/ with chosen values and asserts on the
result (or on the refusal to render).

usage: helm_cases.py HELM_BIN CHART_DIR [GATEWAY_BIN]

Covers: the bare install (generated API keys, dev Redis); the in-chart Redis modes (dev,
standalone, sentinel: StatefulSet, generated password, the gateway's wiring); external Redis
(plain URL/host/cluster, Secret URL, Secret password + host/cluster) and their conflicts; the shutdown timing guards; checksum/config rolling on config changes only;
replicas vs HPA; the connections metric; the auth wiring (secure by default); values.schema.json refusing
unknown keys. With GATEWAY_BIN, the gateway binary must accept every rendered gateway.toml.
"""

import concurrent.futures
import os
import subprocess
import sys
import tomllib

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gatewaybin

HELM, CHART = sys.argv[1], sys.argv[2]
GATEWAY_BIN = sys.argv[3] if len(sys.argv) > 3 else None
FAILURES = []


def render(*sets, values_files=()):
    cmd = [HELM, "template", "t", CHART, "--namespace", "ns", "--kube-version", "1.30.0"]
    for f in values_files:
        cmd += ["-f", f]
    for s in sets:
        cmd += ["--set-string" if s.startswith("str:") else "--set", s.removeprefix("str:")]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr
    return [o for o in yaml.safe_load_all(p.stdout) if o], ""


def find(objs, kind, name=None):
    for o in objs:
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name):
            return o
    return None


def container(objs, name="t-gateway"):
    return find(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def env(objs):
    return {e["name"]: e for e in container(objs).get("env", [])}


def toml(objs):
    return tomllib.loads(find(objs, "ConfigMap", "t-gateway")["data"]["gateway.toml"])


def case(title, fn):
    try:
        fn()
        return None
    except AssertionError as e:
        return f"{title}: {e}"


def ok(*sets):
    objs, errtext = render(*sets)
    assert objs is not None, f"render failed: {errtext.strip()}"
    if GATEWAY_BIN:
        text = find(objs, "ConfigMap", "t-gateway")["data"]["gateway.toml"]
        problem = gatewaybin.check_config(GATEWAY_BIN, text, label="gateway.toml")
        assert problem is None, problem
    return objs


def refused(expect, *sets):
    objs, errtext = render(*sets)
    assert objs is None, f"rendered although {sets} should be refused"
    assert expect in errtext, f"refused, but without {expect!r}: {errtext.strip()}"


def c_default():
    # `helm install gateway ./helm` with no flags: renders, secure (a generated API key).
    objs = ok()
    assert toml(objs)["redis"]["url"] == "redis://t-gateway-redis:6379"
    assert toml(objs)["server"]["listen"] == "0.0.0.0:8080"
    assert find(objs, "Deployment", "t-gateway-redis"), "dev Redis missing"
    assert "replicas" not in find(objs, "Deployment", "t-gateway")["spec"], "replicas set although the HPA owns them"
    assert find(objs, "HorizontalPodAutoscaler"), "HPA missing"
    assert set(env(objs)) == {"GATEWAY__AUTH__API_KEYS"}, f"unexpected env {list(env(objs))}"
    assert env(objs)["GATEWAY__AUTH__API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "t-gateway-api-keys", "key": "api-keys"}
    assert "api_open" not in toml(objs).get("auth", {})
    for kind in ("Ingress", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "StatefulSet"):
        assert not find(objs, kind), f"{kind} rendered by default"


def c_generated_api_keys():
    import base64
    objs = ok()
    secret = find(objs, "Secret", "t-gateway-api-keys")
    assert secret, "no generated API key Secret"
    key = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert len(key) == 40 and key.isalnum(), f"weak generated key {key!r}"
    other = base64.b64decode(find(ok(), "Secret", "t-gateway-api-keys")["data"]["api-keys"]).decode()
    assert other != key, "the same key on two installs"
    # The test pod reads the same Secret.
    pod = find(objs, "Pod", "t-gateway-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["api-keys"]["secret"]["secretName"] == "t-gateway-api-keys"
    # Given keys, or an open API: nothing generated; generate=false without keys is refused.
    assert not find(ok("auth.apiKeys.existingSecret=k"), "Secret", "t-gateway-api-keys")
    assert not find(ok("auth.apiOpen=true"), "Secret")
    assert "api-keys" not in {v["name"] for v in find(ok("auth.apiOpen=true"), "Pod")["spec"]["volumes"]}
    refused("auth.apiKeys.existingSecret", "auth.apiKeys.generate=false")


def statefulset(objs):
    return find(objs, "StatefulSet", "t-gateway-redis")


def sts_env(objs, container_name):
    c = next(c for c in statefulset(objs)["spec"]["template"]["spec"]["containers"] if c["name"] == container_name)
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def c_redis_standalone():
    objs = ok("redis.mode=standalone", "networkPolicy.enabled=true")
    sts = statefulset(objs)
    assert sts["spec"]["replicas"] == 1
    assert [c["name"] for c in sts["spec"]["template"]["spec"]["containers"]] == ["redis"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert not find(objs, "Deployment", "t-gateway-redis"), "dev Redis rendered too"
    assert find(objs, "Secret", "t-gateway-redis-auth"), "no generated Redis password"
    e = env(objs)
    assert e["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "t-gateway-redis-auth", "key": "redis-password"}
    assert e["GATEWAY__REDIS__URL"]["value"] == "redis://:$(REDIS_PASSWORD)@t-gateway-redis:6379"
    assert list(e).index("REDIS_PASSWORD") < list(e).index("GATEWAY__REDIS__URL"), "$(REDIS_PASSWORD) used before defined"
    assert "url" not in toml(objs).get("redis", {}), "the password-less URL in gateway.toml"
    r = sts_env(objs, "redis")
    assert r["FIRST_MASTER"] == "t-gateway-redis-0.t-gateway-redis-headless.ns.svc.cluster.local:6379", r
    assert "SENTINELS" not in r
    script = find(objs, "ConfigMap", "t-gateway-redis-scripts")["data"]["redis-start.sh"]
    assert "appendfsync always" in script
    # The given password Secret is used and nothing is generated.
    objs = ok("redis.mode=standalone", "redis.auth.existingSecret=mine", "redis.auth.key=pw")
    assert not find(objs, "Secret", "t-gateway-redis-auth")
    assert env(objs)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "pw"}
    vols = {v["name"]: v for v in statefulset(objs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["auth"]["secret"]["secretName"] == "mine"


def c_redis_sentinel():
    objs = ok("redis.mode=sentinel", "networkPolicy.enabled=true")
    sts = statefulset(objs)
    assert sts["spec"]["replicas"] == 3
    assert [c["name"] for c in sts["spec"]["template"]["spec"]["containers"]] == ["redis", "sentinel"]
    headless = find(objs, "Service", "t-gateway-redis-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert not find(objs, "Service", "t-gateway-redis"), "a ClusterIP Service in front of a Sentinel set"
    assert find(objs, "PodDisruptionBudget", "t-gateway-redis")["spec"]["maxUnavailable"] == 1
    hosts = [f"t-gateway-redis-{i}.t-gateway-redis-headless.ns.svc.cluster.local:26379" for i in range(3)]
    e = env(objs)
    assert e["GATEWAY__REDIS__SENTINEL_NODES"]["value"] == ",".join(f"redis://:$(REDIS_PASSWORD)@{h}" for h in hosts)
    cfg = toml(objs)["redis"]
    assert cfg["sentinel_master"] == "gateway" and cfg["min_replicas_acked"] == 1, cfg
    s = sts_env(objs, "sentinel")
    assert s["SENTINELS"] == " ".join(hosts) and s["QUORUM"] == "2", s
    assert s["SENTINEL_CONF"].startswith("/data/"), "a Sentinel's state must survive its restart"
    ports = {p["port"] for r in find(objs, "NetworkPolicy", "t-gateway")["spec"]["egress"] for p in r["ports"]}
    assert {6379, 26379} <= ports, ports
    # The operator's own min_replicas_acked wins; the knobs reach the pods.
    objs = ok("redis.mode=sentinel", "config.redis.min_replicas_acked=2", "redis.sentinel.replicas=5",
              "redis.sentinel.quorum=3", "redis.sentinel.masterName=prices")
    assert toml(objs)["redis"]["min_replicas_acked"] == 2
    assert toml(objs)["redis"]["sentinel_master"] == "prices"
    assert statefulset(objs)["spec"]["replicas"] == 5
    assert env(objs)["GATEWAY__REDIS__SENTINEL_NODES"]["value"].count("26379") == 5
    refused("minimum", "redis.mode=sentinel", "redis.sentinel.replicas=2")
    refused("value must be one of", "redis.mode=cluster")


def c_plain_url():
    objs = ok("redis.enabled=false", "externalRedis.url=redis://redis.example:6379/0")
    assert toml(objs)["redis"]["url"] == "redis://redis.example:6379/0"
    assert not find(objs, "Deployment", "t-gateway-redis")


def c_plain_host_tls():
    objs = ok("redis.enabled=false", "externalRedis.host=r.example", "externalRedis.port=6380", "externalRedis.tls=true")
    assert toml(objs)["redis"]["url"] == "rediss://r.example:6380"


def c_plain_cluster():
    objs = ok("redis.enabled=false", "externalRedis.clusterNodes={a:7000,b:7001}", "networkPolicy.enabled=true")
    assert toml(objs)["redis"]["cluster_nodes"] == ["a:7000", "b:7001"]
    assert "url" not in toml(objs)["redis"]
    ports = {p["port"] for r in find(objs, "NetworkPolicy")["spec"]["egress"] for p in r["ports"]}
    assert {7000, 7001, 6379} <= ports, f"egress ports {ports}"


def c_secret_url():
    objs = ok("redis.enabled=false", "externalRedis.existingSecret=r", "externalRedis.existingSecretUrlKey=url")
    e = env(objs)["GATEWAY__REDIS__URL"]["valueFrom"]["secretKeyRef"]
    assert e == {"name": "r", "key": "url"}, e
    assert "url" not in toml(objs).get("redis", {})


def c_secret_password_cluster():
    objs = ok("redis.enabled=false", "externalRedis.existingSecret=r", "externalRedis.existingSecretPasswordKey=pw",
              "externalRedis.clusterNodes={a:7000,redis://b:7001}")
    e = env(objs)
    assert list(e)[:2] == ["REDIS_PASSWORD", "GATEWAY__REDIS__CLUSTER_NODES"], list(e)
    assert e["GATEWAY__REDIS__CLUSTER_NODES"]["value"] == "redis://:$(REDIS_PASSWORD)@a:7000,redis://:$(REDIS_PASSWORD)@b:7001"
    assert "cluster_nodes" not in toml(objs).get("redis", {})


def c_conflicts():
    refused("exclusive", "externalRedis.host=x")  # dev Redis still on
    refused("exclusive", "redis.enabled=false", "externalRedis.host=x", "externalRedis.clusterNodes={a:1}")
    refused("needs existingSecretUrlKey", "redis.enabled=false", "externalRedis.existingSecret=r")
    refused("needs externalRedis.host", "redis.enabled=false", "externalRedis.existingSecret=r",
            "externalRedis.existingSecretPasswordKey=pw")


def c_timing():
    refused("terminationGracePeriodSeconds (40) must exceed", "terminationGracePeriodSeconds=40")
    refused("must exceed lifecycle.preStopSleepSeconds", "lifecycle.preStopSleepSeconds=5")
    refused("must exceed config.drain.delay + config.drain.window", "config.server.shutdown_timeout=25s")
    objs = ok("lifecycle.preStopSleepSeconds=5", "terminationGracePeriodSeconds=50")
    assert container(objs)["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    ok("config.server.shutdown_timeout=1m", "config.drain.window=50s", "terminationGracePeriodSeconds=70")


def c_checksum():
    def checksum(*sets):
        objs = ok(*sets)
        return find(objs, "Deployment", "t-gateway")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    base = checksum()
    assert checksum("config.log.level=debug") != base, "config change does not roll the pods"
    assert checksum("resources.limits.memory=2Gi") == base, "checksum moves without a config change"


def c_replicas():
    objs = ok("autoscaling.enabled=false", "replicaCount=5")
    assert find(objs, "Deployment", "t-gateway")["spec"]["replicas"] == 5
    assert not find(objs, "HorizontalPodAutoscaler")


def c_connections_metric():
    objs = ok("autoscaling.connections.enabled=true", "str:autoscaling.connections.targetAverageValue=2500")
    metrics = find(objs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    pods = [m for m in metrics if m["type"] == "Pods"]
    assert pods and pods[0]["pods"]["metric"]["name"] == "gateway_connections", metrics
    assert pods[0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "2500"}


def c_auth_secrets():
    objs = ok("auth.apiKeys.existingSecret=keys", "auth.jwt.existingSecret=jwt",
              "config.auth.jwt_public_keys[0]=/etc/gateway/jwt/public.pem", "config.auth.jwt_audience=gw")
    assert env(objs)["GATEWAY__AUTH__API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "keys", "key": "api-keys"}
    mounts = {m["mountPath"]: m for m in container(objs)["volumeMounts"]}
    assert mounts["/etc/gateway/jwt"]["readOnly"] is True
    assert mounts["/etc/gateway/gateway.toml"]["subPath"] == "gateway.toml"
    assert "api_open" not in toml(objs).get("auth", {}), toml(objs)
    assert toml(objs)["auth"]["jwt_audience"] == "gw"


def c_auth_secure_by_default():
    # Neither keys (given or generated) nor an explicit open API: refused, saying what to set.
    refused("auth.apiKeys.existingSecret", "auth.apiOpen=false", "auth.apiKeys.generate=false")
    objs = ok("auth.apiOpen=true")
    assert toml(objs)["auth"]["api_open"] is True
    assert "GATEWAY__AUTH__API_KEYS" not in env(objs) if "env" in container(objs) else True
    objs = ok("auth.apiOpen=true", "config.channels.namespaces.chat.subscribe=token",
              "config.limits.max_connections=1000", "str:config.limits.idle_timeout=30s",
              "config.origin.allowed[0]=https://app.example.com")
    assert toml(objs)["channels"]["namespaces"]["chat"]["subscribe"] == "token"
    refused("additional properties", "auth.apiOpen=true", "config.auth.api_open=true")
    refused("value must be one of", "auth.apiOpen=true", "config.channels.default.subscribe=everyone")


def c_ingress():
    # #13.5: an Ingress publishes every path, /api/* included: never with an open API.
    refused("would publish an open API", "ingress.enabled=true", "auth.apiOpen=true")
    objs = ok("ingress.enabled=true", "auth.apiKeys.existingSecret=k")
    assert find(objs, "Ingress")
    objs = ok("ingress.enabled=true", "auth.apiKeys.existingSecret=k", "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-read-timeout=7200")
    ann = find(objs, "Ingress")["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200", "user annotation does not win"
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ann["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    assert ann["nginx.org/websocket-services"] == "t-gateway"
    objs = ok("ingress.enabled=true", "auth.apiKeys.existingSecret=k", "ingress.longLivedConnectionAnnotations=false")
    assert not find(objs, "Ingress")["metadata"].get("annotations")


def c_schema():
    refused("additional properties", "config.auth.api_keys=x")
    refused("additional properties", "config.redis.url=redis://x:6379")
    refused("additional properties", "replicas=3")
    refused("want string", "config.drain.delay=5")


def c_notes():
    def notes(*sets):
        cmd = [HELM, "install", "t", CHART, "--namespace", "ns", "--dry-run=client"]
        for s in sets:
            cmd += ["--set", s]
        p = subprocess.run(cmd, check=False, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout.split("NOTES:", 1)[1]
    text = notes()
    assert "DEV-ONLY Redis" in text
    assert "get secret t-gateway-api-keys" in text and "helm test t" in text, text
    assert "sentinel get-master-addr-by-name gateway" in notes("redis.mode=sentinel")
    assert "DEV-ONLY" not in notes("redis.mode=standalone")
    assert "in-memory backplane" in notes("redis.enabled=false")
    text = notes("redis.enabled=false", "externalRedis.host=r", "auth.apiKeys.existingSecret=k")
    assert "WARNING" not in text and "DEV-ONLY" not in text, text
    text = notes("redis.enabled=false", "externalRedis.host=r", "auth.apiOpen=true")
    assert "WARNING: auth.apiOpen is true" in text, text


def c_readme_kubernetes_commands():
    # The README's Kubernetes line, run as written (no cluster here: --dry-run=client renders and
    # validates exactly what `helm install` would send), and with each `--set` it offers.
    import re
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    line = re.search(r"^- Kubernetes:(.*?)(?=^- |\Z)", readme, re.M | re.S)
    assert line, "README.md has no '- Kubernetes:' line"
    spans = re.findall(r"`([^`]+)`", line.group(1))
    commands = [c for c in spans if c.startswith("helm install")]
    assert commands, f"no helm install command in {line.group(0)!r}"
    variants = [commands[0] + " " + s for s in spans if s.startswith("--set ")]
    for command in commands + variants:
        p = subprocess.run([HELM] + command.split()[1:] + ["--dry-run=client"], cwd=root,
                           check=False, capture_output=True, text=True)
        assert p.returncode == 0, f"{command}: {p.stderr.strip()}"
        assert "NOTES:" in p.stdout, f"{command}: no NOTES"


# The cases are independent: run them side by side (each mostly waits for helm or the gateway).
CASES = [(t[2:], fn) for t, fn in list(globals().items()) if t.startswith("c_") and callable(fn)]
with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    for result in pool.map(lambda c: case(*c), CASES):
        if result:
            FAILURES.append(result)
PASSED = len(CASES) - len(FAILURES)

for f in FAILURES:
    print(f"  error: {f}")
print(f"  chart behaviour: {PASSED} passed, {len(FAILURES)} failed")
sys.exit(1 if FAILURES else 0)
