# serf-operator image: the operator binary and Debian's `serf` agent, non-root. The Helm
# chart runs it three ways: `serf-operator agent-config` (init), `serf agent` (sidecar) and
# `serf-operator run`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p serf-operator --bin serf-operator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends serf ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/serf-operator /usr/local/bin/serf-operator
USER 65532:65532
ENTRYPOINT ["serf-operator"]
