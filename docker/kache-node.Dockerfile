# syntax=docker/dockerfile:1.7
# kache cache node: a memcached-compatible server.
#
# Build from the repository root:
#   docker build -f docker/kache-node.Dockerfile -t ghcr.io/kache-dev/kache-node:dev .
# (docker/kache-node.Dockerfile.dockerignore keeps target/ and .git out of the context.)

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Cache the registry and the target dir between builds; copy the binary out of
# the cache mount so the next stage can use it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p kache-node --bin kache-node \
 && install -D -m 0755 target/release/kache-node /out/kache-node

# distroless/cc: glibc, libgcc, CA certificates, no shell; "nonroot" is UID/GID 65532.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="kache-node" \
      org.opencontainers.image.description="kache cache node: a memcached-compatible server" \
      org.opencontainers.image.source="https://github.com/kache-dev/kache" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/kache-node /usr/local/bin/kache-node
USER 65532:65532
EXPOSE 11211 11212 11280
ENTRYPOINT ["/usr/local/bin/kache-node"]
