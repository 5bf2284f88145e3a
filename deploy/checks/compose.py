#!/usr/bin/env python3
"""Offline validation of deploy/compose.yaml (there is no Docker engine, and `docker compose` is
not installed): what `docker compose config` would reject, and a few things it would not.

usage: compose.py COMPOSE_FILE COMPOSE_SPEC_SCHEMA_JSON [GATEWAY_BIN]

1. YAML with anchors and merge keys resolved, then Compose variable interpolation (${VAR},
   ${VAR:-default}, ${VAR-default}, $VAR, $$) with an empty environment, as Compose does.
2. The result against the official Compose Specification JSON schema (the copy dclint ships in
   its npm package: schemas/compose.schema.json), with jsonschema.
3. Cross-references the schema cannot express: depends_on targets exist and, for
   service_healthy, have a healthcheck; named volumes are declared; bind-mount sources and the
   build context/Dockerfile exist; no host port is published twice.
4. Project invariants: each gateway's stop_grace_period > server.shutdown_timeout >
   drain.delay + drain.window; Prometheus scrapes exactly the gateway services; nginx.conf still
   has the three upstream lines the nginx service rewrites to the gateway containers; Grafana's
   provisioning points at the compose Prometheus and at the mounted dashboard; with GATEWAY_BIN,
   the gateway binary accepts the nodes' GATEWAY__* environment.
"""

import json
import os
import re
import sys

import jsonschema
import yaml

ERRORS = []
WARNINGS = []


def err(msg):
    ERRORS.append(msg)


def warn(msg):
    WARNINGS.append(msg)


VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op in (":-", "-"):
            if val is None or (op == ":-" and val == ""):
                return arg
        elif op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                err(f"required variable {name} is not set: {arg}")
                return ""
        elif op in (":+", "+"):
            return arg if (val is not None and (op == "+" or val != "")) else ""
        if val is None:
            warn(f"variable {name} is not set: defaulting to an empty string")
            return ""
        return val

    return VAR.sub(sub, value)


def duration_seconds(text):
    """Go/Compose or humantime durations like 45s, 1m30s, 500ms."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "us": 1e-6}
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*([0-9.]+)\s*(ms|us|s|m|h)", text):
        if m.start() != pos:
            raise ValueError(f"bad duration {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"bad duration {text!r}")
    return total


def env_dict(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def main():
    compose_path, schema_path = sys.argv[1], sys.argv[2]
    base = os.path.dirname(os.path.abspath(compose_path))
    with open(compose_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    # Interpolate with an empty environment: defaults must make the file complete on their own.
    doc = interpolate(raw, {})
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        err(f"schema: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}")

    services = doc.get("services") or {}
    volumes = doc.get("volumes") or {}
    published = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            if dep not in services:
                err(f"{name}: depends_on unknown service {dep}")
            elif spec.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                err(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            source = vol.get("source") if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith((".", "/")):
                path = os.path.normpath(os.path.join(base, source))
                if not os.path.exists(path):
                    if path.endswith(os.path.join("nginx", "certs")):
                        warn(f"{name}: {source} does not exist yet: create the TLS certificate "
                             "(see the comment at the top of compose.yaml)")
                    else:
                        err(f"{name}: bind-mount source {source} does not exist ({path})")
            elif source not in volumes:
                err(f"{name}: named volume {source} is not declared under volumes:")
        build = svc.get("build")
        if build:
            ctx = build if isinstance(build, str) else build.get("context", ".")
            ctx_path = os.path.normpath(os.path.join(base, ctx))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not os.path.isdir(ctx_path):
                err(f"{name}: build context {ctx} does not exist")
            elif not os.path.isfile(os.path.join(ctx_path, dockerfile)):
                err(f"{name}: Dockerfile {dockerfile} not found in context {ctx_path}")
        for port in svc.get("ports") or []:
            text = str(port if not isinstance(port, dict) else f"{port.get('host_ip', '')}:{port.get('published')}")
            host = text.rsplit(":", 1)[0]
            if host in published:
                err(f"{name}: host port {host} already published by {published[host]}")
            published[host] = name

    gateways = sorted(n for n, s in services.items() if s.get("image", "").startswith("gateway"))
    if len(gateways) != 3:
        err(f"expected 3 gateway services, found {gateways}")
    for name in gateways:
        svc, env = services[name], env_dict(services[name])
        try:
            grace = duration_seconds(svc.get("stop_grace_period", "10s"))
            shutdown = duration_seconds(env["GATEWAY__SERVER__SHUTDOWN_TIMEOUT"])
            drain = duration_seconds(env["GATEWAY__DRAIN__DELAY"]) + duration_seconds(env["GATEWAY__DRAIN__WINDOW"])
        except (KeyError, ValueError) as e:
            err(f"{name}: drain timing not fully set: {e}")
            continue
        if not drain < shutdown < grace:
            err(f"{name}: need drain.delay + drain.window ({drain}s) < server.shutdown_timeout "
                f"({shutdown}s) < stop_grace_period ({grace}s)")
        # #13.5: nginx proxies the nodes' main port to the world, so an open (keyless) API must
        # live on the internal listener only.
        if env.get("GATEWAY__AUTH__API_OPEN", "").lower() == "true" and not env.get("GATEWAY__AUTH__API_LISTEN"):
            err(f"{name}: GATEWAY__AUTH__API_OPEN without GATEWAY__AUTH__API_LISTEN would publish an "
                "open API through nginx: move the API to the internal listener or set API keys")
        if svc.get("read_only") is not True:
            err(f"{name}: the gateway runs with a read-only root filesystem")
        if len(sys.argv) > 3:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import gatewaybin
            problem = gatewaybin.check_config(sys.argv[3], None, env=env, label=f"{name} environment")
            if problem:
                err(problem)

    prom_path = os.path.join(base, "prometheus", "prometheus.yml")
    with open(prom_path, encoding="utf-8") as f:
        prom = yaml.safe_load(f)
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    if "gateway" not in jobs:
        err("prometheus.yml: no job_name gateway (deploy/prometheus/rules.yml selects job=\"gateway\")")
    else:
        targets = sorted(t for sc in jobs["gateway"].get("static_configs", []) for t in sc["targets"])
        # /metrics is served on the nodes' internal listener (GATEWAY__AUTH__API_LISTEN).
        want = sorted(f"{g}:8090" for g in gateways)
        if targets != want:
            err(f"prometheus.yml: gateway targets {targets} != compose gateways {want}")

    nginx_conf = os.path.join(base, "nginx", "nginx.conf")
    with open(nginx_conf, encoding="utf-8") as f:
        conf = f.read()
    for port in (8081, 8082, 8083):
        if not re.search(rf"^\s*server\s+127\.0\.0\.1:{port}[\s;]", conf, re.M):
            err(f"nginx.conf: no `server 127.0.0.1:{port}` upstream line: the nginx service's "
                "rewrite to gateway-N:8080 would not apply")

    # Grafana: the provisioned datasource reaches the compose Prometheus, and the dashboard
    # provider reads the directory where compose mounts the dashboard.
    grafana = services.get("grafana", {})
    mounts = {}
    for vol in grafana.get("volumes") or []:
        parts = vol.split(":")
        mounts[parts[1]] = os.path.normpath(os.path.join(base, parts[0]))
    prov = mounts.get("/etc/grafana/provisioning")
    if not prov:
        err("grafana: /etc/grafana/provisioning is not mounted")
    else:
        with open(os.path.join(prov, "datasources", "prometheus.yml"), encoding="utf-8") as f:
            ds = yaml.safe_load(f)
        urls = [d.get("url") for d in ds.get("datasources", []) if d.get("type") == "prometheus"]
        if ds.get("apiVersion") != 1 or urls != ["http://prometheus:9090"] or "prometheus" not in services:
            err(f"grafana datasource provisioning: want one prometheus datasource at http://prometheus:9090, got {urls}")
        with open(os.path.join(prov, "dashboards", "gateway.yml"), encoding="utf-8") as f:
            dp = yaml.safe_load(f)
        paths = [p.get("options", {}).get("path") for p in dp.get("providers", [])]
        dash_targets = [t for t, src in mounts.items() if src.endswith("dashboard.json")]
        if dp.get("apiVersion") != 1 or not dash_targets or [os.path.dirname(dash_targets[0])] != paths:
            err(f"grafana dashboard provider paths {paths} do not hold the mounted dashboard {dash_targets}")
        else:
            with open(mounts[dash_targets[0]], encoding="utf-8") as f:
                json.load(f)

    for w in WARNINGS:
        print(f"  warning: {w}")
    for e in ERRORS:
        print(f"  error: {e}")
    if ERRORS:
        sys.exit(1)
    print(f"  {compose_path}: {len(services)} services valid against the Compose Specification schema; "
          "references, drain timing, Prometheus targets, nginx upstreams and Grafana provisioning consistent"
          + ("; the gateway binary accepts the nodes' environment" if len(sys.argv) > 3 else ""))


if __name__ == "__main__":
    main()
