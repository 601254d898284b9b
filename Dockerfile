# syntax=docker/dockerfile:1

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, compiled against a placeholder main: this layer is reused until
# Cargo.toml or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
# The workspace's other members (the load tool) must be present for cargo to read the
# workspace; only the server is built.
COPY bench/Cargo.toml bench/
# Every target the manifests declare needs a file, or cargo refuses them. The bench keeps its
# placeholder: it is never built here.
RUN mkdir -p src tests/it bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && echo '' > src/lib.rs \
 && echo '' > tests/it/main.rs \
 && cargo build --release --locked -p streamgate --bin streamgate \
 && rm -rf src tests

# Then the real sources. COPY keeps their (older) mtimes and the placeholder's artifacts would
# look fresh to cargo, so drop them before building the real crate.
COPY src ./src
RUN rm -rf target/release/.fingerprint/streamgate-* target/release/deps/streamgate-* \
           target/release/deps/libstreamgate-* target/release/streamgate \
 && cargo build --release --locked -p streamgate --bin streamgate \
 && install -m 0755 target/release/streamgate /usr/local/bin/streamgate

# ---- runtime ----
FROM debian:bookworm-slim
# curl is for the healthcheck in docker-compose.yml (GET /health/ready).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin streamgate

COPY --from=builder /usr/local/bin/streamgate /usr/local/bin/streamgate
# Default configuration (the demo streams); docker-compose.yml mounts the same file over it.
COPY examples/streamgate.toml /etc/streamgate/streamgate.toml

ENV STREAMGATE_CONFIG=/etc/streamgate/streamgate.toml \
    STREAMGATE_LISTEN=0.0.0.0:8080
USER streamgate
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/streamgate"]
