# syntax=docker/dockerfile:1
# keyturn's image: the release binary on distroless/cc (glibc, libgcc and the CA bundle that
# lapin's native roots read; no shell, no package manager), running as the image's nonroot user
# with the audit log in /data. `docker compose up -d --build` builds it; see the README.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build between image builds; the binary is copied
# out because a cache mount is gone once its step ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keyturn \
    && cp target/release/keyturn /usr/local/bin/keyturn
# The audit log's directory. Copied below with the runtime user as owner, so a fresh named volume
# on /data inherits that owner (Docker fills an empty volume from the image's directory).
RUN mkdir -p /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/keyturn /usr/local/bin/keyturn
COPY config /etc/keyturn
COPY --from=build --chown=65532:65532 /data /data
ENV KEYTURN_CONFIG=/etc/keyturn/default.toml
ENV KEYTURN_AUDIT__PATH=/data/keyturn-audit.db
# Reachable from outside the container; publish it on the host's loopback only (see compose).
ENV KEYTURN_OPS__LISTEN=0.0.0.0:9464
USER 65532:65532
WORKDIR /data
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/keyturn", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/keyturn"]
CMD ["worker"]
