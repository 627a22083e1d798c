#!/usr/bin/env bash
# Installs the third-party programs the test suite talks to, only when they are missing.
# Idempotent: a second run does nothing.
set -euo pipefail

need=()
command -v memcached  >/dev/null 2>&1 || need+=(memcached)
command -v memccapable >/dev/null 2>&1 || need+=(libmemcached-tools)
command -v nutcracker >/dev/null 2>&1 || [ -x /usr/sbin/nutcracker ] || need+=(nutcracker)
/usr/bin/python3 -c 'import pymemcache' >/dev/null 2>&1 || need+=(python3-pymemcache)
/usr/bin/python3 -c 'import pylibmc'    >/dev/null 2>&1 || need+=(python3-pylibmc)
/usr/bin/python3 -c 'import pytest'     >/dev/null 2>&1 || need+=(python3-pytest)
command -v openssl    >/dev/null 2>&1 || need+=(openssl)
# The network-fault suite (tests/netfault): namespaces, veths, bridges, tc; iptables rules
# inside the namespaces it creates.
command -v ip         >/dev/null 2>&1 || need+=(iproute2)
command -v tc         >/dev/null 2>&1 || need+=(iproute2)
command -v iptables   >/dev/null 2>&1 || need+=(iptables)
/usr/bin/python3 -c 'import yaml'       >/dev/null 2>&1 || need+=(python3-yaml)
# The images (scripts/build-images.sh) and the real-cluster suite (tests/k8s).
command -v umoci      >/dev/null 2>&1 || need+=(umoci)
command -v skopeo     >/dev/null 2>&1 || need+=(skopeo)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# pymemcache's own integration tests (tests/python/test_tools.py runs them against
# kache-node) ship only in its source distribution.
PYMEMCACHE_SDIST_VERSION=4.0.0
deps_dir="${KACHE_TEST_DEPS:-$HOME/.cache/kache-test-deps}"
if [ ! -f "$deps_dir/pymemcache-$PYMEMCACHE_SDIST_VERSION/pymemcache/test/test_integration.py" ]; then
  echo "fetching the pymemcache $PYMEMCACHE_SDIST_VERSION source distribution (its integration tests)"
  mkdir -p "$deps_dir"
  python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$deps_dir" \
    "pymemcache==$PYMEMCACHE_SDIST_VERSION"
  tar -xzf "$deps_dir/pymemcache-$PYMEMCACHE_SDIST_VERSION.tar.gz" -C "$deps_dir"
fi

# The distribution's memcached service is not wanted: tests start their own on free ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet memcached 2>/dev/null; then
  systemctl stop memcached || true
fi
echo "test dependencies present"
