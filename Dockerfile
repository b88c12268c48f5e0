FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/keyturn /usr/local/bin/keyturn
COPY config /etc/keyturn
ENV KEYTURN_CONFIG=/etc/keyturn/default.toml
USER 65534
ENTRYPOINT []
