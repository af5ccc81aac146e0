# syntax=docker/dockerfile:1
#
# wsguard container image.
#   docker build -t wsguard:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 wsguard:0.1.0
# The baked-in policy (deploy/policy.yaml) proxies to ws://127.0.0.1:3000;
# mount your own at /etc/wsguard/policy.yaml (see deploy/kubernetes.yaml).

# Base images, pinned by digest so that a rebuild starts from the same bytes.
# (The digests were taken from public Dockerfiles pinning the same tags; they
# could not be checked against the registries from the build machine, which
# has no registry access. Re-check with
#   docker buildx imagetools inspect rust:1.95.0-bookworm
# and bump tag and digest together.) scripts/image.sh overrides both with
# tag-only names when it builds on local stand-ins of these images.
ARG RUST_IMAGE=rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f

# ---------------------------------------------------------------- builder ---
# Same Debian release as the runtime image (glibc 2.36). Bump the Rust
# version deliberately; the crate's MSRV is 1.88 (Cargo.toml rust-version).
FROM ${RUST_IMAGE} AS builder

WORKDIR /build

# 1. Dependencies only: a stub crate with the real manifest and lockfile, so
#    this layer is reused until Cargo.toml or Cargo.lock change. The cache
#    mount keeps downloaded crates across builds without baking them into a
#    layer (BuildKit, the default builder since Docker 23).
#    Cargo.toml declares targets of its own ([[bench]] sign and deflate,
#    [[test]] fuzz_corpus): cargo wants each one's file to parse the
#    manifest, though `--bin wsguard` never builds them, so each gets a stub.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    mkdir src benches tests \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for f in benches/sign.rs benches/deflate.rs tests/fuzz_corpus.rs; do echo 'fn main() {}' > "$f"; done \
    && cargo build --release --locked --bin wsguard \
    && rm -rf src benches

# 2. The real sources. src/demo.rs include_str!s config.example.yaml, so it
#    is needed at build time. benches/ holds the declared benches; tests/ is
#    not in the build context (.dockerignore), so the stub of the declared
#    [[test]] stays. examples/ is auto-discovered only and not needed.
COPY config.example.yaml ./
COPY benches ./benches
COPY src ./src
# COPY keeps the sources' (older) mtimes; drop the stub's fingerprints so
# cargo cannot mistake the stub build for the real one.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    rm -rf target/release/.fingerprint/wsguard-* \
    && cargo build --release --locked --bin wsguard \
    && install -D -m 0755 target/release/wsguard /out/wsguard

# ---------------------------------------------------------------- runtime ---
# No shell, no package manager; glibc + libgcc_s, which is all wsguard links.
FROM ${RUNTIME_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="wsguard" \
      org.opencontainers.image.description="A WebSocket hardening sidecar proxy: origin/JWT checks, per-message HMAC, keepalive, limits" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

# Root-owned and read-only for the runtime user.
COPY --from=builder /out/wsguard /usr/local/bin/wsguard
COPY deploy/policy.yaml /etc/wsguard/policy.yaml

# 65532 is distroless's "nonroot" user. Numeric, so that Kubernetes'
# runAsNonRoot can verify it (it refuses to start a non-numeric USER).
USER 65532:65532

# 8080: WebSocket proxy (listen). 9090: admin /healthz /readyz /metrics.
EXPOSE 8080 9090

# There is no shell or curl in this image, and wsguard has no health-check
# subcommand yet, so Docker cannot probe it. Kubernetes probes /healthz
# (liveness) and /readyz (readiness) on port 9090 instead.
HEALTHCHECK NONE

# Exec form: wsguard is PID 1 and gets SIGTERM directly (it handles TERM,
# INT and HUP = reload the policy).
ENTRYPOINT ["/usr/local/bin/wsguard", "run", "-c", "/etc/wsguard/policy.yaml"]
