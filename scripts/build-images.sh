#!/usr/bin/env bash
# Builds the kache-node and kache-operator container images from the release
# binaries, without a registry or a docker daemon, as docker-archive tarballs
# (`docker load`, `ctr images import`, `kind load image-archive` and the k8s
# kit's load-image.sh all read them).
#
#   scripts/build-images.sh [--out DIR] [--tag TAG] [--no-build]
#
# DIR defaults to target/images, TAG to the workspace version (the chart's
# appVersion, so `helm install` finds them with its default values). Writes
# DIR/kache-node.tar and DIR/kache-operator.tar, named
# ghcr.io/kache-dev/kache-{node,operator}:TAG.
#
# docker/*.Dockerfile stay the release path. This script reads the final stage
# of each (USER, EXPOSE, ENTRYPOINT, LABEL and the binary's destination) so
# both give the same image config; the runtime filesystem mirrors
# distroless/cc-debian12:nonroot: glibc and the libraries the binary links,
# CA certificates, /etc/passwd with nonroot (65532), /tmp, no shell.
# Tools: umoci (assembles the OCI image) and skopeo (writes the docker
# archive), from Debian, installed here when missing.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=target/images
TAG=""
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --tag) TAG=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-images: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$TAG" ]; then
  TAG=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
fi
REGISTRY=ghcr.io/kache-dev
CARGO=${CARGO:-cargo}

need=()
command -v umoci >/dev/null 2>&1 || need+=(umoci)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
if [ ${#need[@]} -gt 0 ]; then
  echo "build-images: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ "$BUILD" = 1 ]; then
  "$CARGO" build --locked --release -p kache-node --bin kache-node -p kache-operator --bin kache-operator
fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}

work=$(mktemp -d "${TMPDIR:-/tmp}/kache-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# The value of the final stage's INSTRUCTION lines (after the last FROM),
# continuation lines joined.
final_stage() {
  awk '
    /\\$/ { sub(/\\$/, ""); buf = buf $0; next }
    { line = buf $0; buf = "" }
    line ~ /^FROM / { stage = "" }
    { stage = stage line "\n" }
    END { printf "%s", stage }
  ' "$1"
}

# The runtime root filesystem: the binary, the libraries ldd names (and
# glibc's NSS modules, which it loads at run time), CA certificates, users.
make_rootfs() {
  local root=$1 bin=$2 dest=$3
  mkdir -p "$root"/etc/ssl/certs "$root"/tmp "$root"/home/nonroot
  chmod 1777 "$root/tmp"
  chown 65532:65532 "$root/home/nonroot"
  install -D -m 0755 "$bin" "$root$dest"
  local libs lib
  libs=$(ldd "$bin" | grep -oE '/[^ ]+' || true)
  for lib in $libs /lib/x86_64-linux-gnu/libnss_files.so.2 /lib/x86_64-linux-gnu/libnss_dns.so.2 \
             /lib/x86_64-linux-gnu/libresolv.so.2; do
    [ -e "$lib" ] && [ ! -e "$root$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
  # distroless keeps /lib64/ld-linux-x86-64.so.2 where the ELF header names it.
  install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
  echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
}

build_image() {
  local name=$1 dockerfile=docker/$1.Dockerfile
  local stage user entrypoint dest bin image=$REGISTRY/$1:$TAG
  stage=$(final_stage "$dockerfile")
  user=$(printf '%s' "$stage" | sed -n 's/^USER \(.*\)/\1/p' | tail -1)
  entrypoint=$(printf '%s' "$stage" | sed -n 's/^ENTRYPOINT \[\(.*\)\]/\1/p' | tail -1)
  dest=$(printf '%s' "$stage" | sed -n 's/^COPY --from=[^ ]* [^ ]* \(.*\)/\1/p' | tail -1)
  bin=$TARGET_DIR/release/$name
  [ -x "$bin" ] || { echo "build-images: $bin missing (run without --no-build)" >&2; exit 1; }
  [ -n "$user" ] && [ -n "$entrypoint" ] && [ -n "$dest" ] ||
    { echo "build-images: cannot read USER/ENTRYPOINT/COPY from $dockerfile" >&2; exit 1; }

  # One layer: unpack the empty image, lay the runtime filesystem into its bundle, repack.
  # (umoci 0.4's `insert` leaves the layer's tar unterminated; repack writes it whole.)
  local layout=$work/$name-oci bundle=$work/$name-bundle
  umoci init --layout "$layout"
  umoci new --image "$layout:$TAG"
  umoci unpack --image "$layout:$TAG" "$bundle" >/dev/null
  make_rootfs "$bundle/rootfs" "$bin" "$dest"
  umoci repack --image "$layout:$TAG" --history.created_by "build-images.sh: $name runtime" "$bundle"

  local args=(--config.user "$user" --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
              --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt --config.workingdir /)
  local e
  while IFS= read -r e; do args+=(--config.entrypoint "$e"); done < <(printf '%s' "$entrypoint" | python3 -c 'import json,sys; print("\n".join(json.loads("["+sys.stdin.read()+"]")))')
  local port
  for port in $(printf '%s' "$stage" | sed -n 's/^EXPOSE //p'); do
    case "$port" in */*) ;; *) port=$port/tcp ;; esac
    args+=(--config.exposedports "$port")
  done
  # LABEL k="v" k="v" ...: one --config.label per pair.
  while IFS= read -r e; do [ -n "$e" ] && args+=(--config.label "$e"); done < <(printf '%s' "$stage" |
    sed -n 's/^LABEL //p' | python3 -c 'import shlex,sys; print("\n".join(shlex.split(sys.stdin.read())))')
  umoci config --image "$layout:$TAG" "${args[@]}"

  rm -f "$OUT/$name.tar"
  skopeo copy --quiet "oci:$layout:$TAG" "docker-archive:$OUT/$name.tar:$image"
  echo "built $image -> $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1))"
}

build_image kache-node
build_image kache-operator
