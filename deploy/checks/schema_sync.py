#!/usr/bin/env python3
"""The chart's values.schema.json lists exactly the configuration keys the gateway knows.

usage: schema_sync.py gateway/src/config.rs helm/values.schema.json

The gateway rejects unknown sections and keys (serde deny_unknown_fields), and the chart's
schema mirrors that so a typo fails at `helm install` instead of in a crash-looping pod. This
check reads the sections and fields of the configuration structs in config.rs and compares them
with the schema's `config` properties, so a key added to (or removed from) the gateway fails here
until the chart follows. Keys the chart sets itself are expected to be absent from the schema.
"""

import json
import re
import sys

# Keys the chart sets itself, or that hold secrets and so never go in the ConfigMap (they come
# from Secrets through the environment).
CHART_SET = {
    ("server", "listen"),
    ("redis", "url"),
    ("redis", "cluster_nodes"),
    ("auth", "api_keys"),
    ("auth", "api_open"),
    ("auth", "jwt_hs256_keys"),
}


def struct_fields(src, name):
    m = re.search(r"pub struct " + re.escape(name) + r"\s*\{(.*?)\n\}", src, re.S)
    if not m:
        raise SystemExit(f"  error: struct {name} not found in config.rs")
    return re.findall(r"^\s*pub\s+(\w+)\s*:\s*([\w:<>, ]+?),?\s*$", m.group(1), re.M)


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        src = f.read()
    with open(sys.argv[2], encoding="utf-8") as f:
        schema = json.load(f)
    code = set()
    for section, typ in struct_fields(src, "Config"):
        for key, _ in struct_fields(src, typ.strip()):
            code.add((section, key))
    chart = set(CHART_SET)
    for section, sub in schema["properties"]["config"]["properties"].items():
        for key in sub.get("properties", {}):
            chart.add((section, key))
    missing = sorted(code - chart)
    extra = sorted(chart - code)
    for s, k in missing:
        print(f"  error: the gateway knows {s}.{k}, helm/values.schema.json does not (add it under config.{s})")
    for s, k in extra:
        print(f"  error: helm/values.schema.json allows config.{s}.{k}, the gateway does not know it")
    if missing or extra:
        sys.exit(1)
    print(f"  helm/values.schema.json config keys match gateway/src/config.rs ({len(code)} keys)")


if __name__ == "__main__":
    main()
