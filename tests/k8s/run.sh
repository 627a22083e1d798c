#!/usr/bin/env bash
# The real-cluster suite (`make k8s-test`, part of `make test`).
#
# 1. Builds the images from the release binaries (scripts/build-images.sh) and checks
#    them against docker/*.Dockerfile (tests/k8s/test_images.py): always.
# 2. With $KACHE_E2E_KUBECONFIG: runs against that cluster (its node must already have
#    the images, e.g. `kind load image-archive target/images/*.tar`).
#    Otherwise with the k8s kit beside the project (../shared/k8s, or $KACHE_K8S_KIT):
#    stops whatever an earlier run left (down.sh recovers a cluster whose processes were
#    killed), starts the kit's single-node cluster (up.sh), loads the images, and stops
#    it again at the end, also on failure. When up.sh exits 3 (its Kubernetes binaries
#    are not built on this machine) or there is no kit, it says so and skips the rest.
# 3. Runs the user journey (tests/k8s/test_journey.py: helm install ... uninstall) and
#    the operator's API-server suites (operator/tests/e2e.rs, e2e_faults.rs) on real pods.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-/usr/bin/python3}
KIT=${KACHE_K8S_KIT:-$ROOT/../shared/k8s}
started=$(date +%s)

bash scripts/build-images.sh --no-build
"$PYTHON" -m pytest -q -p no:cacheprovider tests/k8s/test_images.py

if [ -n "${KACHE_E2E_KUBECONFIG:-}" ]; then
  echo "k8s suite: using the cluster of KACHE_E2E_KUBECONFIG=$KACHE_E2E_KUBECONFIG"
  KUBECTL=${KUBECTL:-kubectl}
else
  if [ ! -x "$KIT/up.sh" ]; then
    echo "k8s suite: SKIPPED, no k8s kit at $KIT and KACHE_E2E_KUBECONFIG is not set"
    exit 0
  fi
  bash "$KIT/down.sh" >/dev/null 2>&1 || bash "$KIT/down.sh"
  set +e
  out=$(bash "$KIT/up.sh")
  rc=$?
  set -e
  if [ "$rc" -eq 3 ]; then
    echo "k8s suite: SKIPPED, the kit's Kubernetes binaries are missing (up.sh exit 3; see $KIT/README.md)"
    exit 0
  fi
  [ "$rc" -eq 0 ] || { echo "k8s suite: up.sh failed ($rc)" >&2; exit "$rc"; }
  trap 'bash "$KIT/down.sh" >/dev/null 2>&1 || bash "$KIT/down.sh"' EXIT
  eval "$out"
  export KACHE_E2E_KUBECONFIG=$KUBECONFIG
  work=$(mktemp -d "${TMPDIR:-/tmp}/kache-k8s-images.XXXXXX")
  bash "$KIT/busybox-image.sh" "$work/busybox.tar" >/dev/null
  # The operator e2e suites' in-process operator gives its CacheClusters the :e2e tag.
  bash scripts/build-images.sh --no-build --tag e2e --out "$work"
  bash "$KIT/load-image.sh" target/images/kache-node.tar target/images/kache-operator.tar \
    "$work/busybox.tar" "$work/kache-node.tar"
  rm -rf "$work"
  HELM=$(bash "$KIT/get-helm.sh" 2>/dev/null)
  export KACHE_E2E_HELM=${KACHE_E2E_HELM:-$HELM}
fi
export KUBECTL
: "${KACHE_E2E_HELM:=$(command -v helm || echo "${KACHE_TOOLS_DIR:-$HOME/.cache/kache}/helm/helm")}"
export KACHE_E2E_HELM

"$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/k8s/test_journey.py
cargo test -p kache-operator --test e2e --test e2e_faults -- --test-threads 1
echo "k8s suite: passed in $(( $(date +%s) - started )) s"
