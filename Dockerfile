# possync image: one binary, every subcommand. Built with S3 (MinIO) table support.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake zlib1g-dev libssl-dev && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY schemas ./schemas
RUN cargo build --release --locked --features s3 --bin possync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 curl && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 possync
COPY --from=build /src/target/release/possync /usr/local/bin/possync
USER possync
ENTRYPOINT ["possync"]
CMD ["--help"]
