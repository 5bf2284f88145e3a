#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests (helm template output, kubectl kustomize output).

usage: manifests.py [--k8s-version 1.30.0] [--rules FILE] [--dashboard FILE]
                    [--gateway-bin PATH] MANIFEST.yaml...

1. Every object against the Kubernetes OpenAPI schemas that kubernetes-validate ships (offline),
   strict: unknown fields are errors. Kinds without a core schema are errors too, except the
   prometheus-operator CRDs ServiceMonitor and PrometheusRule, which are skipped explicitly (and
   checked by 3 instead).
2. References between objects: Service/PDB/NetworkPolicy/topology selectors select the pods of
   exactly one workload (the gateway's Deployment, the in-chart Redis' Deployment or StatefulSet),
   HPA and Ingress targets exist, volumes name existing ConfigMaps, container ports named in probes
   and Services exist, a StatefulSet's serviceName is a headless Service of the render.
3. Project invariants: gateway.toml parses as TOML and fits the shutdown sequence
   (drain.delay + drain.window < server.shutdown_timeout < terminationGracePeriodSeconds - preStop);
   the gateway binary itself accepts gateway.toml (with --gateway-bin); a PrometheusRule carries
   exactly the groups of --rules; a dashboard ConfigMap carries exactly --dashboard.
"""

import argparse
import json
import re
import sys
import tomllib

import kubernetes_validate
import yaml

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
ERRORS = []


def err(msg):
    ERRORS.append(msg)


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"((?:\d+(?:ms|s|m|h))+)", str(text).replace(" ", ""))
    if not m:
        return None
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", m.group(1)))


def selects(selector, labels):
    if not selector:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        val = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and val not in expr["values"]:
            return False
        if op == "NotIn" and val in expr["values"]:
            return False
        if op == "Exists" and expr["key"] not in labels:
            return False
        if op == "DoesNotExist" and expr["key"] in labels:
            return False
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s-version", default="1.30.0")
    ap.add_argument("--rules")
    ap.add_argument("--dashboard")
    ap.add_argument("--gateway-bin")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    for path in args.files:
        before = len(ERRORS)
        with open(path, encoding="utf-8") as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        by_kind = {}
        for obj in objs:
            by_kind.setdefault(obj["kind"], []).append(obj)
        validated, skipped = 0, []

        # 1. schemas
        for obj in objs:
            if obj["kind"] in CRD_KINDS:
                skipped.append(name_of(obj))
                continue
            try:
                kubernetes_validate.validate(obj, args.k8s_version, strict=True)
                validated += 1
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                err(f"{path}: {name_of(obj)}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                err(f"{path}: {name_of(obj)}: {e.message} (not a core kind and not a known CRD)")

        # 2. references
        configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
        deployments = {o["metadata"]["name"]: o for o in by_kind.get("Deployment", [])}
        # Workloads: the gateway's Deployment, and the in-chart Redis (a Deployment or a StatefulSet).
        workloads = {f"{o['kind']}/{o['metadata']['name']}": o
                     for o in by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])}
        services = {o["metadata"]["name"]: o for o in by_kind.get("Service", [])}
        pods = {n: d["spec"]["template"] for n, d in workloads.items()}
        for name, dep in workloads.items():
            tpl = dep["spec"]["template"]
            labels = tpl["metadata"].get("labels", {})
            if not selects(dep["spec"]["selector"], labels):
                err(f"{path}: {name}: selector does not match its own pod labels")
            others = [n for n, p in pods.items() if n != name and selects(dep["spec"]["selector"], p["metadata"].get("labels", {}))]
            if others:
                err(f"{path}: {name}: selector also matches the pods of {others}")
            spec = tpl["spec"]
            for tsc in spec.get("topologySpreadConstraints") or []:
                if not selects(tsc.get("labelSelector"), labels):
                    err(f"{path}: {name}: a topologySpreadConstraint does not select its pods")
            for vol in spec.get("volumes") or []:
                cm = (vol.get("configMap") or {}).get("name")
                if cm and cm not in configmaps:
                    err(f"{path}: {name}: volume {vol['name']} names missing ConfigMap {cm}")
            if dep["kind"] == "StatefulSet":
                svc = services.get(dep["spec"].get("serviceName"))
                if svc is None or svc["spec"].get("clusterIP") != "None":
                    err(f"{path}: {name}: serviceName {dep['spec'].get('serviceName')} is not a headless Service of the render")
            for c in spec["containers"]:
                ports = {p.get("name") for p in c.get("ports") or []}
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        err(f"{path}: {name}: {probe} uses unknown port {port}")
        for svc in by_kind.get("Service", []):
            targets = [n for n, p in pods.items() if selects({"matchLabels": svc["spec"].get("selector")}, p["metadata"].get("labels", {}))]
            if len(targets) != 1:
                err(f"{path}: {name_of(svc)}: selects the pods of {targets}, expected exactly one workload")
                continue
            names = {p.get("name") for c in pods[targets[0]]["spec"]["containers"] for p in c.get("ports") or []}
            for port in svc["spec"]["ports"]:
                if isinstance(port.get("targetPort"), str) and port["targetPort"] not in names:
                    err(f"{path}: {name_of(svc)}: targetPort {port['targetPort']} is not a container port")
        for kind in ("PodDisruptionBudget", "NetworkPolicy"):
            for obj in by_kind.get(kind, []):
                sel = obj["spec"].get("selector") or obj["spec"].get("podSelector")
                # (Bare Pods too: the chart's `helm test` pod has a NetworkPolicy of its own.)
                candidates = list(pods.values()) + by_kind.get("Pod", [])
                if not any(selects(sel, p["metadata"].get("labels", {})) for p in candidates):
                    err(f"{path}: {name_of(obj)}: selects no pods")
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            target = hpa["spec"]["scaleTargetRef"]
            if target["kind"] != "Deployment" or target["name"] not in deployments:
                err(f"{path}: {name_of(hpa)}: scale target {target} not found")
            elif ("replicas" in deployments[target["name"]]["spec"]
                  and "helm.sh/chart" in deployments[target["name"]]["metadata"].get("labels", {})):
                # (The kustomize base keeps replicas: 3 as its documented starting point.)
                err(f"{path}: {name_of(hpa)}: the chart's Deployment also sets replicas (every upgrade would reset the HPA's count)")
        for ing in by_kind.get("Ingress", []):
            for rule in ing["spec"].get("rules", []):
                for p in rule.get("http", {}).get("paths", []):
                    svc = p["backend"]["service"]
                    if svc["name"] not in services:
                        err(f"{path}: {name_of(ing)}: backend service {svc['name']} not found")
                    elif svc["port"].get("name") not in {x.get("name") for x in services[svc["name"]]["spec"]["ports"]}:
                        err(f"{path}: {name_of(ing)}: backend port {svc['port']} not on the Service")
        for sm in by_kind.get("ServiceMonitor", []):
            sel = sm["spec"]["selector"]
            matched = [s for s in services.values() if selects(sel, s["metadata"].get("labels", {}))]
            if len(matched) != 1:
                err(f"{path}: {name_of(sm)}: selects Services {[name_of(s) for s in matched]}, expected one")
            elif sm["spec"]["endpoints"][0]["port"] not in {p.get("name") for p in matched[0]["spec"]["ports"]}:
                err(f"{path}: {name_of(sm)}: endpoint port not on the Service")

        # 3. invariants
        tomls = 0
        for cm in configmaps.values():
            text = (cm.get("data") or {}).get("gateway.toml")
            if text is None:
                continue
            tomls += 1
            try:
                cfg = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                err(f"{path}: {name_of(cm)}: gateway.toml: {e}")
                continue
            if args.gateway_bin:
                problem = __import__("gatewaybin").check_config(args.gateway_bin, text, label=f"{path}: {name_of(cm)}")
                if problem:
                    err(problem)
            users = [d for d in deployments.values()
                     if any((v.get("configMap") or {}).get("name") == cm["metadata"]["name"]
                            for v in d["spec"]["template"]["spec"].get("volumes") or [])]
            shutdown = seconds(cfg.get("server", {}).get("shutdown_timeout", "10s"))
            delay = seconds(cfg.get("drain", {}).get("delay", "0s"))
            window = seconds(cfg.get("drain", {}).get("window", "0s"))
            if None in (shutdown, delay, window):
                continue
            if not delay + window < shutdown:
                err(f"{path}: {name_of(cm)}: drain.delay + drain.window ({delay + window}s) must be < server.shutdown_timeout ({shutdown}s)")
            for d in users:
                spec = d["spec"]["template"]["spec"]
                grace = spec.get("terminationGracePeriodSeconds", 30)
                pre = 0
                for c in spec["containers"]:
                    pre = max(pre, (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0))
                if not pre + shutdown < grace:
                    err(f"{path}: {name_of(d)}: terminationGracePeriodSeconds {grace} must exceed preStop {pre}s + shutdown_timeout {shutdown}s")
        if deployments and not tomls:
            err(f"{path}: no ConfigMap with gateway.toml")
        for pr in by_kind.get("PrometheusRule", []):
            if not args.rules:
                err(f"{path}: {name_of(pr)}: no --rules file to compare with")
                continue
            with open(args.rules, encoding="utf-8") as f:
                want = yaml.safe_load(f)
            if pr["spec"] != want:
                err(f"{path}: {name_of(pr)}: spec differs from {args.rules}")
        for cm in configmaps.values():
            if "grafana_dashboard" not in cm["metadata"].get("labels", {}):
                continue
            if not args.dashboard:
                err(f"{path}: {name_of(cm)}: no --dashboard file to compare with")
                continue
            with open(args.dashboard, encoding="utf-8") as f:
                want = json.load(f)
            got = [json.loads(v) for v in (cm.get("data") or {}).values()]
            if got != [want]:
                err(f"{path}: {name_of(cm)}: dashboard differs from {args.dashboard}")

        if len(ERRORS) == before:
            kinds = sorted({o["kind"] for o in objs})
            print(f"  {path}: {validated} objects valid against Kubernetes {args.k8s_version} (strict)"
                  f"{'; skipped CRDs ' + ', '.join(skipped) if skipped else ''}; references and"
                  f" invariants hold{' (gateway binary accepts gateway.toml)' if args.gateway_bin and tomls else ''}"
                  f" [{', '.join(kinds)}]")

    for e in ERRORS:
        print(f"  error: {e}")
    sys.exit(1 if ERRORS else 0)


if __name__ == "__main__":
    main()
