# syntax=docker/dockerfile:1
# fusionsync: multi-stage build, small non-root runtime image.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: only Cargo.toml/Cargo.lock changes rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin fusionsync \
    && rm -rf src target/release/.fingerprint/fusionsync-*
# Queries are checked at run time, not compile time: no database is needed to build.
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked --bin fusionsync && strip target/release/fusionsync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin fusionsync
COPY --from=build /src/target/release/fusionsync /usr/local/bin/fusionsync
USER 10001
EXPOSE 8080
ENV FUSIONSYNC__HTTP__LISTEN=0.0.0.0:8080
# No curl in the image: bash's /dev/tcp asks /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["fusionsync"]
CMD ["run"]
