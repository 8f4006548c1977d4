# syntax=docker/dockerfile:1.7
# canary-injector container image.
#   docker build -t ghcr.io/canary-injector/canary-injector:0.1.0 .
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

ARG RUST_VERSION=1

# --- build -----------------------------------------------------------------------------
# glibc target on Debian 12: the binary matches the distroless cc-debian12 runtime's glibc,
# and ring's C/asm parts build with the toolchain in this image.
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
# The whole context (see .dockerignore); cache mounts keep the registry and target/ between
# builds, so a source change recompiles only this crate. No dummy-main trick: it breaks as
# soon as Cargo.toml names a bench, test or lib target whose file is not copied yet.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin canary-injector \
 && install -D -m 0755 target/release/canary-injector /out/canary-injector

# --- runtime ---------------------------------------------------------------------------
# Distroless: glibc, libgcc, CA certificates and tzdata; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="canary-injector" \
      org.opencontainers.image.description="Kubernetes mutating admission webhook that labels workloads for Istio canary routing" \
      org.opencontainers.image.source="https://github.com/canary-injector/canary-injector" \
      org.opencontainers.image.url="https://github.com/canary-injector/canary-injector" \
      org.opencontainers.image.documentation="https://github.com/canary-injector/canary-injector/blob/main/README.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="canary-injector" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /out/canary-injector /usr/local/bin/canary-injector
USER 65532:65532
# Writable home of the nonroot user: a bare `docker run IMAGE` (no --tls-cert) keeps its
# development certificate in ./certs/dev here. In Kubernetes the root filesystem is
# read-only and the certificate comes from the mounted Secret.
WORKDIR /home/nonroot
# 8443: HTTPS webhook (/mutate, /healthz, /readyz); 9090: plain-HTTP /metrics.
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/canary-injector"]
CMD ["serve"]
